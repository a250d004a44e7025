//! Bounded retries with exponential backoff: every wait of the bridge on NATS has a deadline.

use std::future::Future;
use std::time::{Duration, Instant};

/// First pause between two attempts.
const FIRST: Duration = Duration::from_millis(100);
/// Longest pause between two attempts.
const MAX: Duration = Duration::from_secs(2);

/// Retries `attempt` with backoff (100 ms doubling to 2 s) until it succeeds or `budget` has
/// passed since the first failure. Each failure is reported once on stderr as `what`. Returns
/// the last error when the budget is spent.
pub async fn with_backoff<T, E: std::fmt::Display, F, Fut>(
    what: &str,
    budget: Duration,
    mut attempt: F,
) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let start = Instant::now();
    let mut pause = FIRST;
    let mut failures = 0u32;
    loop {
        match attempt().await {
            Ok(v) => {
                if failures > 0 {
                    eprintln!(
                        "aegis-nats: {what}: succeeded after {failures} failed attempts ({:.1} s)",
                        start.elapsed().as_secs_f64()
                    );
                }
                return Ok(v);
            }
            Err(e) => {
                failures += 1;
                if start.elapsed() >= budget {
                    return Err(format!(
                        "{what}: gave up after {failures} attempts in {:.1} s (--retry-for {}): {e}",
                        start.elapsed().as_secs_f64(),
                        budget.as_secs()
                    ));
                }
                if failures == 1 {
                    eprintln!(
                        "aegis-nats: {what}: {e}; retrying with backoff for up to {} s",
                        budget.as_secs()
                    );
                }
                tokio::time::sleep(pause.min(budget.saturating_sub(start.elapsed()))).await;
                pause = (pause * 2).min(MAX);
            }
        }
    }
}

/// Connects to NATS at `url`, retrying with backoff for up to `budget`. Once connected, the
/// client reconnects by itself; the callers bound how long they wait for that.
pub async fn connect(
    url: &str,
    name: &str,
    budget: Duration,
) -> Result<async_nats::Client, String> {
    with_backoff(&format!("connecting to {url}"), budget, || {
        async_nats::ConnectOptions::new()
            .name(name)
            .connection_timeout(Duration::from_secs(5))
            .max_reconnects(None)
            .reconnect_delay_callback(|n| (FIRST * 2u32.saturating_pow(n.min(5) as u32)).min(MAX))
            .connect(url.to_string())
    })
    .await
}
