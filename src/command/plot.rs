//! `bench --plot FILE.svg`: the latency distributions of the bench's rows as one percentile
//! plot, drawn by plotters' SVG backend.
//!
//! The x axis is the percentile on a "nines" scale, `-log10(1 - q)`: p50 sits at 0.3, p90 at
//! 1, p99 at 2, p99.9 at 3, so the tail gets as much room as the median. It runs from p50 to
//! the largest sample of the longest row. The y axis is the latency in ns, on a log scale, so
//! a 50 ns ping-pong and a 50 µs socket fit on one plot. One line per row, with a marker on
//! every point.

use std::path::Path;

use plotters::prelude::*;

use super::CliError;

/// The plot's size in pixels.
const SIZE: (u32, u32) = (960, 560);

/// The lines' colours, one per row in turn: distinct on white, and for most colour vision.
const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// One line of the plot: a row's name and its (quantile, ns) points, quantiles in `0.5..1`.
pub struct Series<'a> {
    /// The row's name (the legend).
    pub name: &'a str,
    /// The distribution, by increasing quantile.
    pub points: Vec<(f64, u64)>,
}

/// The nines of quantile `q`: `-log10(1 - q)` (p90 → 1, p99 → 2).
fn nines(q: f64) -> f64 {
    -(1.0 - q).max(1e-12).log10()
}

/// Thousandths of a nine: the x coordinate. (plotters formats the ticks of an integer axis
/// bound to chosen key points, not those of an `f64` one.)
const MILLI: f64 = 1000.0;

/// The x coordinate of quantile `q`.
fn x_of(q: f64) -> i64 {
    (nines(q) * MILLI).round() as i64
}

/// The label of the tick at `x` nines: `p50`, `p90`, `p99`, `p99.9`, ...
fn percentile_label(x: f64) -> String {
    let p = 100.0 * (1.0 - 10f64.powf(-x));
    // As many decimals as the nines need (p99.99 has two), and no trailing zeros.
    let decimals = (x.round() as usize).saturating_sub(2);
    let s = format!("{p:.decimals$}");
    format!("p{s}")
}

/// A latency in ns as a short label: `800 ns`, `2 µs`, `1.5 ms`.
fn latency_label(ns: f64) -> String {
    let (v, unit) = if ns >= 1e6 {
        (ns / 1e6, "ms")
    } else if ns >= 1e3 {
        (ns / 1e3, "µs")
    } else {
        (ns, "ns")
    };
    let s = format!("{v:.1}");
    format!("{} {unit}", s.trim_end_matches(".0"))
}

/// Draws `series` as a percentile plot into the SVG file `path` (created or replaced).
/// Fails if there is nothing to draw or the file cannot be written.
pub fn latency_svg(path: &Path, title: &str, series: &[Series]) -> Result<(), CliError> {
    let all = || series.iter().flat_map(|s| s.points.iter());
    let (Some(lo), Some(hi)) = (
        all().map(|p| p.1).filter(|&v| v > 0).min(),
        all().map(|p| p.1).max(),
    ) else {
        return Err(CliError("no latency sample to plot".into()));
    };
    let x_lo = x_of(0.5);
    let x_hi = all().map(|p| x_of(p.0)).fold(MILLI as i64, i64::max);
    // p50, then every whole nine up to the longest tail: p90, p99, p99.9, ...
    let ticks: Vec<i64> = std::iter::once(x_lo)
        .chain((1..).map(|n| n * MILLI as i64).take_while(|&x| x <= x_hi))
        .collect();
    let (y_lo, y_hi) = (lo as f64 / 1.5, hi as f64 * 1.5);

    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(16)
        .margin_right(48)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(
            (x_lo..x_hi + 1).with_key_points(ticks),
            (y_lo..y_hi).log_scale(),
        )
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (one way)")
        .x_label_formatter(&|x| percentile_label(*x as f64 / MILLI))
        .y_label_formatter(&|y| latency_label(*y))
        .draw()
        .map_err(plot_err)?;
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points = s
            .points
            .iter()
            .map(|&(q, ns)| (x_of(q), (ns as f64).max(y_lo)));
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)).point_size(2))
            .map_err(plot_err)?
            .label(s.name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 18, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

fn plot_err<E: std::fmt::Display>(e: E) -> CliError {
    CliError(format!("cannot draw the plot: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_name_percentiles_and_latencies() {
        assert_eq!(percentile_label(nines(0.5)), "p50");
        assert_eq!(percentile_label(1.0), "p90");
        assert_eq!(percentile_label(2.0), "p99");
        assert_eq!(percentile_label(3.0), "p99.9");
        assert_eq!(percentile_label(5.0), "p99.999");
        assert_eq!(latency_label(800.0), "800 ns");
        assert_eq!(latency_label(2000.0), "2 µs");
        assert_eq!(latency_label(1_500_000.0), "1.5 ms");
    }

    #[test]
    fn nothing_to_plot_is_an_error() {
        let path = std::env::temp_dir().join(format!("aegis-plot-{}.svg", std::process::id()));
        let e = latency_svg(&path, "t", &[]).err().map(|e| e.0);
        assert_eq!(e.as_deref(), Some("no latency sample to plot"));
        assert!(!path.exists());
    }
}
