//! The text tables of every command (`session list`, `session inspect`, `session run`, the
//! demo, `bench`, `top --once`): a header row and aligned columns, laid out by comfy-table,
//! never padded by hand.
//!
//! One style for all: no borders, two spaces between columns, text left-aligned and numbers
//! right-aligned (header included, so a number sits under the end of its header), no trailing
//! blanks. Columns are as wide as their widest cell; nothing is wrapped or cut (the output is
//! often read by scripts and `grep`).

use comfy_table::{presets, CellAlignment, ColumnConstraint, Table};

/// How the cells of a column line up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Align {
    /// Text: along the left edge of the column.
    Left,
    /// Numbers: along the right edge of the column.
    Right,
}

/// Spaces between two columns.
const GAP: u16 = 2;

/// A text table with a header row.
pub struct TextTable {
    table: Table,
}

impl TextTable {
    /// A table with these columns (header, alignment).
    pub fn new(columns: &[(&str, Align)]) -> TextTable {
        let mut table = Table::new();
        table.load_style(presets::NOTHING);
        table.set_header(columns.iter().map(|(h, _)| *h).collect::<Vec<_>>());
        let last = columns.len().saturating_sub(1);
        for (i, (_, align)) in columns.iter().enumerate() {
            if let Some(c) = table.column_mut(i) {
                c.set_cell_alignment(match align {
                    Align::Left => CellAlignment::Left,
                    Align::Right => CellAlignment::Right,
                });
                c.set_padding((0, if i == last { 0 } else { GAP }));
                // A column is as wide as its widest cell: never wrapped, never cut.
                c.set_constraint(ColumnConstraint::ContentWidth);
            }
        }
        TextTable { table }
    }

    /// Appends a row (one cell per column).
    pub fn row<I, T>(&mut self, cells: I) -> &mut TextTable
    where
        I: IntoIterator<Item = T>,
        T: ToString,
    {
        self.table
            .add_row(cells.into_iter().map(|c| c.to_string()).collect::<Vec<_>>());
        self
    }

    /// The table's lines, each prefixed with `indent` spaces, without trailing blanks.
    pub fn lines(&self, indent: usize) -> Vec<String> {
        let pad = " ".repeat(indent);
        self.table
            .lines()
            .map(|l| format!("{pad}{}", l.trim_end()))
            .collect()
    }

    /// Prints the table on stdout, each line prefixed with `indent` spaces.
    pub fn print(&self, indent: usize) {
        for l in self.lines(indent) {
            println!("{l}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up_under_their_headers() {
        let mut t = TextTable::new(&[("NAME", Align::Left), ("EVENTS", Align::Right)]);
        t.row(["a", "1234567"]).row(["a-longer-name", "5"]);
        let lines = t.lines(2);
        assert_eq!(
            lines,
            [
                "  NAME            EVENTS",
                "  a              1234567",
                "  a-longer-name        5",
            ]
        );
    }

    #[test]
    fn a_table_without_rows_is_its_header() {
        let t = TextTable::new(&[("A", Align::Left), ("B", Align::Right)]);
        assert_eq!(t.lines(0), ["A  B"]);
    }
}
