//! Human output for the CLI: aligned tables, aligned `key  value` blocks, times, the waiting spinner, and
//! writes to stdout and stderr that never panic (a closed pipe ends the command quietly).
//!
//! Everything shown to a person passes through [`clean`], so text an agent wrote (reasoning, notes,
//! parameters) cannot move the cursor or recolour the terminal. Machine output (`--json`) does not come
//! through here except for [`json`], which prints the server's document unchanged.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::Failure;

/// Writes text to stdout; a closed pipe (`| head`) becomes a quiet stop.
pub fn out(text: &str) -> Result<(), Failure> {
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_all(text.as_bytes())
        .and_then(|()| if text.ends_with('\n') || text.is_empty() { Ok(()) } else { stdout.write_all(b"\n") });
    match written.and_then(|()| stdout.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(Failure::Quiet(0)),
        Err(e) => Err(Failure::Message(format!("cannot write to stdout: {e}"))),
    }
}

/// Writes one line to stderr; a stderr that cannot be written to is ignored.
pub fn note(text: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

/// Prints a JSON document as is (pretty, one document).
pub fn json(value: &Value) -> Result<(), Failure> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Failure::Message(e.to_string()))?;
    out(&text)
}

/// Text safe for a terminal: control characters (escape sequences, carriage returns, and newlines when
/// `multiline` is false) and the invisible format characters ([`crate::text::is_hidden_format`]: bidi
/// overrides, zero widths) become visible escapes.
pub fn clean_text(text: &str, multiline: bool) -> String {
    let mut cleaned = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' if multiline => cleaned.push('\n'),
            '\t' if multiline => cleaned.push('\t'),
            c if c.is_control() || crate::text::is_hidden_format(c) => cleaned.extend(c.escape_default()),
            c => cleaned.push(c),
        }
    }
    cleaned
}

/// One table cell or value on one line.
pub fn clean(text: &str) -> String {
    clean_text(text, false)
}

/// A field of a JSON object as one line of text: strings as they are, numbers and booleans printed,
/// null or absent as `-`, anything else as compact JSON.
pub fn field(value: &Value, pointer: &str) -> String {
    match value.pointer(pointer) {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) if s.is_empty() => "-".into(),
        Some(Value::String(s)) => clean(s),
        Some(other) => clean(&other.to_string()),
    }
}

/// A JSON value printed for people, indented by `indent` spaces: a string verbatim (multi-line kept),
/// anything else as pretty JSON.
pub fn block(value: &Value, indent: usize) -> String {
    let text = match value {
        Value::String(s) => clean_text(s, true),
        other => clean_text(&serde_json::to_string_pretty(other).unwrap_or_default(), true),
    };
    let pad = " ".repeat(indent);
    text.lines().map(|line| format!("{pad}{line}")).collect::<Vec<_>>().join("\n")
}

fn parse_time(value: &Value, pointer: &str) -> Option<DateTime<Utc>> {
    let text = value.pointer(pointer)?.as_str()?;
    DateTime::parse_from_rfc3339(text).ok().map(|t| t.with_timezone(&Utc))
}

/// An RFC 3339 time as `YYYY-MM-DD HH:MM:SS` (UTC), or `-`.
pub fn time(value: &Value, pointer: &str) -> String {
    match parse_time(value, pointer) {
        Some(t) => t.format("%Y-%m-%d %H:%M:%S").to_string(),
        None => field(value, pointer),
    }
}

/// A time relative to now: `3m ago` or `in 14m`, or `-`.
pub fn relative(value: &Value, pointer: &str) -> String {
    let Some(t) = parse_time(value, pointer) else { return "-".into() };
    let seconds = (t - Utc::now()).num_seconds();
    if seconds.abs() < 2 {
        return "now".into();
    }
    let span = human_span(seconds.unsigned_abs());
    if seconds >= 0 { format!("in {span}") } else { format!("{span} ago") }
}

/// A time with its distance from now: `2025-01-02 03:04:05 (in 14m)`.
pub fn time_and_relative(value: &Value, pointer: &str) -> String {
    match parse_time(value, pointer) {
        Some(_) => format!("{} ({})", time(value, pointer), relative(value, pointer)),
        None => "-".into(),
    }
}

pub fn human_span(seconds: u64) -> String {
    match seconds {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86_400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// Rows under a header, each column as wide as its widest cell, two spaces apart; the last column is not
/// padded, so long values (URLs, explanations) run on instead of pushing every row wide.
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&'static str]) -> Table {
        Table { headers: headers.to_vec(), rows: Vec::new() }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells.into_iter().map(|c| clean(&c)).collect());
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn render(&self) -> String {
        let columns = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let line = |cells: Vec<&str>| {
            let mut text = String::new();
            for (i, cell) in cells.iter().enumerate().take(columns) {
                if i + 1 == columns {
                    text.push_str(cell);
                } else {
                    let width = widths.get(i).copied().unwrap_or(0);
                    text.push_str(cell);
                    text.push_str(&" ".repeat(width.saturating_sub(cell.chars().count()) + 2));
                }
            }
            text.trim_end().to_owned()
        };
        let mut lines = vec![line(self.headers.clone())];
        for row in &self.rows {
            lines.push(line(row.iter().map(String::as_str).collect()));
        }
        lines.join("\n")
    }
}

/// `label  value` lines with the values aligned; values are cleaned to one line each.
pub fn details(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(label, _)| label.chars().count()).max().unwrap_or(0);
    pairs
        .iter()
        .map(|(label, value)| {
            let pad = " ".repeat(width - label.chars().count() + 2);
            format!("{label}{pad}{}", clean(value)).trim_end().to_owned()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Shows that the command is waiting: a spinner with the elapsed time on a terminal, one plain line
/// otherwise (a log file or a pipe gets no carriage returns). Stop it before printing the result.
pub struct Spinner {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Spinner {
    pub fn start(message: String) -> Spinner {
        if !std::io::stderr().is_terminal() {
            note(&format!("{message} ..."));
            return Spinner { stop: None, task: None };
        }
        let (stop, mut stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            const FRAMES: [char; 10] = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];
            let started = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let mut frame = 0usize;
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = tick.tick() => {}
                }
                let glyph = FRAMES.get(frame % FRAMES.len()).copied().unwrap_or('.');
                frame += 1;
                let elapsed = human_span(started.elapsed().as_secs());
                let _ = write!(std::io::stderr().lock(), "\r\x1b[2K{glyph} {message} ({elapsed})");
            }
            let _ = write!(std::io::stderr().lock(), "\r\x1b[2K");
        });
        Spinner { stop: Some(stop), task: Some(task) }
    }

    /// Clears the spinner line and waits until it is gone.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_leave_the_last_column_unpadded() {
        let mut table = Table::new(&["ID", "STATE", "NOTE"]);
        table.row(vec!["a".into(), "pending".into(), "x".into()]);
        table.row(vec!["abcdef".into(), "ok".into(), "line\nbreak\x1b[31m".into()]);
        assert_eq!(
            table.render(),
            "ID      STATE    NOTE\na       pending  x\nabcdef  ok       line\\nbreak\\u{1b}[31m"
        );
    }

    #[test]
    fn details_align_labels() {
        assert_eq!(details(&[("id", "x".into()), ("state", "y".into())]), "id     x\nstate  y");
    }

    #[test]
    fn spans_read_naturally() {
        assert_eq!(human_span(5), "5s");
        assert_eq!(human_span(125), "2m");
        assert_eq!(human_span(3 * 3600 + 5 * 60), "3h05m");
        assert_eq!(human_span(2 * 86_400 + 3600), "2d1h");
    }
}
