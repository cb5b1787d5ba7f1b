//! Pictures as PNG: line charts (loss, latency and memory curves), gate heatmaps and
//! score grids (needle heatmaps), drawn on an RGB canvas with a built-in 5x7 font.
//!
//! Drawing here instead of through a plotting crate keeps the build free of system font
//! and graphics libraries; the charts need only lines, rectangles and short labels.

use anyhow::{Context, Result};
use duo_core::HeadPattern;
use std::path::Path;

/// An RGB image.
pub struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

type Rgb = [u8; 3];
const WHITE: Rgb = [255, 255, 255];
const BLACK: Rgb = [0, 0, 0];
const GREY: Rgb = [200, 200, 200];

/// Line colours, in series order.
const PALETTE: [Rgb; 8] =
    [[31, 119, 180], [214, 39, 40], [44, 160, 44], [255, 127, 14], [148, 103, 189], [140, 86, 75], [227, 119, 194], [23, 190, 207]];

impl Canvas {
    /// A white canvas.
    pub fn new(w: usize, h: usize) -> Self {
        Self { w, h, px: vec![255; w * h * 3] }
    }

    fn set(&mut self, x: i64, y: i64, c: Rgb) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            let i = (y as usize * self.w + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    /// Fills a rectangle.
    pub fn rect(&mut self, x: i64, y: i64, w: i64, h: i64, c: Rgb) {
        for yy in y..y + h {
            for xx in x..x + w {
                self.set(xx, yy, c);
            }
        }
    }

    /// A line of the given thickness (Bresenham, with square pens).
    pub fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), thick: i64, c: Rgb) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.rect(x - thick / 2, y - thick / 2, thick, thick, c);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// Text with its top-left corner at (x, y); each font pixel is `scale` pixels.
    pub fn text(&mut self, x: i64, y: i64, s: &str, scale: i64, c: Rgb) {
        for (n, ch) in s.chars().enumerate() {
            let rows = glyph(ch);
            for (r, bits) in rows.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0x10 >> col) != 0 {
                        self.rect(x + (n as i64 * 6 + col) * scale, y + r as i64 * scale, scale, scale, c);
                    }
                }
            }
        }
    }

    /// Text rotated a quarter turn (reading bottom to top), its bottom-left at (x, y).
    pub fn text_up(&mut self, x: i64, y: i64, s: &str, scale: i64, c: Rgb) {
        for (n, ch) in s.chars().enumerate() {
            for (r, bits) in glyph(ch).iter().enumerate() {
                for col in 0..5 {
                    if bits & (0x10 >> col) != 0 {
                        self.rect(x + r as i64 * scale, y - (n as i64 * 6 + col + 1) * scale, scale, scale, c);
                    }
                }
            }
        }
    }

    /// Writes the canvas as an 8-bit RGB PNG, creating the folder if needed.
    pub fn save(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let mut enc = png::Encoder::new(std::io::BufWriter::new(file), self.w as u32, self.h as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.write_header()?.write_image_data(&self.px)?;
        Ok(())
    }
}

/// Width in pixels of `s` drawn at `scale`.
pub fn text_width(s: &str, scale: i64) -> i64 {
    (s.chars().count() as i64 * 6 - 1).max(0) * scale
}

/// One line of a chart.
pub struct Series {
    /// Legend text.
    pub name: String,
    /// (x, y) points, drawn in order.
    pub points: Vec<(f64, f64)>,
}

/// Round tick values covering [lo, hi].
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let span = (hi - lo).max(1e-12);
    let raw = span / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|s| span / s <= 6.0).unwrap_or(10.0 * mag);
    let mut v = (lo / step).ceil() * step;
    let mut out = Vec::new();
    while v <= hi + step * 1e-9 {
        out.push(if v.abs() < step * 1e-9 { 0.0 } else { v });
        v += step;
    }
    out
}

/// A compact number label: 1500 -> "1500", 0.25 -> "0.25", 2e-5 -> "2E-5".
fn label(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs();
    if (1e-3..1e6).contains(&a) {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        format!("{v:.0e}").to_uppercase()
    }
}

/// A line chart with axes, ticks, axis labels and a legend.
pub fn line_chart(path: &Path, title: &str, x_label: &str, y_label: &str, series: &[Series]) -> Result<()> {
    line_chart_in(path, title, x_label, y_label, series, None)
}

/// [`line_chart`] with the y axis spanning at least `y_span` (scores: 0 to 1), and the x
/// axis padded so that no point sits on an axis.
pub fn line_chart_in(path: &Path, title: &str, x_label: &str, y_label: &str, series: &[Series], y_span: Option<(f64, f64)>) -> Result<()> {
    let (w, h) = (900i64, 560i64);
    let (left, right, top, bottom) = (90i64, 30i64, 50i64, 70i64);
    let mut c = Canvas::new(w as usize, h as usize);
    let pts = series.iter().flat_map(|s| s.points.iter()).filter(|(x, y)| x.is_finite() && y.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if let Some((lo, hi)) = y_span {
        let pad = (x1 - x0).max(1e-9) * 0.05;
        (x0, x1, y0, y1) = (x0 - pad, x1 + pad, y0.min(lo), y1.max(hi));
    }
    if y0 > 0.0 && y0 < 0.5 * y1 {
        y0 = 0.0;
    }
    if x1 - x0 < 1e-12 {
        x1 = x0 + 1.0;
    }
    if y1 - y0 < 1e-12 {
        y1 = y0 + 1.0;
    }
    let pw = w - left - right;
    let ph = h - top - bottom;
    let sx = |x: f64| left + ((x - x0) / (x1 - x0) * pw as f64).round() as i64;
    let sy = |y: f64| top + ph - ((y - y0) / (y1 - y0) * ph as f64).round() as i64;
    for t in ticks(y0, y1) {
        c.line((left, sy(t)), (left + pw, sy(t)), 1, GREY);
        let l = label(t);
        c.text(left - 8 - text_width(&l, 2), sy(t) - 7, &l, 2, BLACK);
    }
    for t in ticks(x0, x1) {
        c.line((sx(t), top), (sx(t), top + ph), 1, GREY);
        let l = label(t);
        c.text(sx(t) - text_width(&l, 2) / 2, top + ph + 8, &l, 2, BLACK);
    }
    c.line((left, top), (left, top + ph), 2, BLACK);
    c.line((left, top + ph), (left + pw, top + ph), 2, BLACK);
    c.text((w - text_width(title, 3)) / 2, 12, title, 3, BLACK);
    c.text(left + (pw - text_width(x_label, 2)) / 2, h - 30, x_label, 2, BLACK);
    c.text_up(14, top + (ph + text_width(y_label, 2)) / 2, y_label, 2, BLACK);
    for (i, s) in series.iter().enumerate() {
        let col = PALETTE[i % PALETTE.len()];
        let p: Vec<(i64, i64)> = s.points.iter().filter(|(x, y)| x.is_finite() && y.is_finite()).map(|&(x, y)| (sx(x), sy(y))).collect();
        for seg in p.windows(2) {
            c.line(seg[0], seg[1], 3, col);
        }
        if p.len() < 30 {
            for &(x, y) in &p {
                c.rect(x - 4, y - 4, 9, 9, col);
            }
        }
        // Scores (a fixed y span) sit high: their legend goes to the bottom right.
        let ly = if y_span.is_some() { top + ph - 12 - (series.len() - i) as i64 * 22 } else { top + 10 + i as i64 * 22 };
        let lx = left + pw - 20 - text_width(&s.name, 2) - 30;
        c.rect(lx, ly + 3, 22, 8, col);
        c.text(lx + 30, ly, &s.name, 2, BLACK);
    }
    c.save(path)
}

/// A colour ramp close to viridis (dark blue at 0, yellow at 1).
fn viridis(v: f32) -> Rgb {
    let stops: [[f32; 3]; 5] = [[68., 1., 84.], [59., 82., 139.], [33., 145., 140.], [94., 201., 98.], [253., 231., 37.]];
    let x = v.clamp(0.0, 1.0) * 4.0;
    let i = (x.floor() as usize).min(3);
    let f = x - i as f32;
    let mut out = [0u8; 3];
    for c in 0..3 {
        out[c] = (stops[i][c] + (stops[i + 1][c] - stops[i][c]) * f).round() as u8;
    }
    out
}

/// Red (0) through yellow to green (1), as needle-in-a-haystack figures colour scores.
fn red_green(v: f64) -> Rgb {
    let v = v.clamp(0.0, 1.0) as f32;
    let (r, g, b) = if v < 0.5 { (230.0, 80.0 + 340.0 * v, 60.0) } else { (230.0 - 360.0 * (v - 0.5), 250.0 - 60.0 * (v - 0.5), 60.0 + 40.0 * (v - 0.5)) };
    [r.round() as u8, g.round() as u8, b.round() as u8]
}

/// Gate heatmap: one cell per (layer, KV head) coloured by gate value, retrieval heads of
/// `pattern` outlined in white, layer numbers on the left, head numbers on top, and a
/// colour bar.
pub fn gate_heatmap(path: &Path, gates: &[Vec<f32>], pattern: &HeadPattern) -> Result<()> {
    let (rows, cols) = (gates.len() as i64, gates.first().map_or(0, Vec::len) as i64);
    let cell = 18i64;
    let (left, top) = (70i64, 60i64);
    let w = (left + cols * cell + 120).max(360);
    let h = top + rows * cell + 30;
    let mut c = Canvas::new(w as usize, h as usize);
    c.text(10, 10, "GATES (LAYER X KV HEAD)", 2, BLACK);
    c.text(10, 32, "OUTLINED: RETRIEVAL", 1, BLACK);
    for k in 0..cols {
        if cols <= 16 || k % 4 == 0 {
            c.text(left + k * cell + 4, top - 12, &k.to_string(), 1, BLACK);
        }
    }
    for (l, row) in gates.iter().enumerate() {
        let y = top + l as i64 * cell;
        if rows <= 40 || l % 4 == 0 {
            let s = l.to_string();
            c.text(left - 8 - text_width(&s, 1), y + 5, &s, 1, BLACK);
        }
        for (k, &g) in row.iter().enumerate() {
            let x = left + k as i64 * cell;
            c.rect(x, y, cell, cell, [20, 20, 20]);
            c.rect(x + 1, y + 1, cell - 2, cell - 2, if pattern.is_retrieval(l, k) { WHITE } else { [20, 20, 20] });
            c.rect(x + 3, y + 3, cell - 6, cell - 6, viridis(g));
        }
    }
    let bx = left + cols * cell + 30;
    let bar_h = (rows * cell).max(60);
    for i in 0..bar_h {
        let v = 1.0 - i as f32 / (bar_h - 1) as f32;
        c.rect(bx, top + i, 20, 1, viridis(v));
    }
    c.text(bx + 26, top, "1", 2, BLACK);
    c.text(bx + 26, top + bar_h - 14, "0", 2, BLACK);
    c.save(path)
}

/// A score grid: rows (for example depths) by columns (for example lengths), each cell
/// coloured red to green by its score in [0, 1] and labelled with it; missing cells grey.
pub fn score_grid(path: &Path, title: &str, row_labels: &[String], col_labels: &[String], values: &[Vec<Option<f64>>]) -> Result<()> {
    let cell_w = 64i64;
    let cell_h = 36i64;
    let left = 20 + row_labels.iter().map(|s| text_width(s, 2)).max().unwrap_or(0) + 12;
    let top = 70i64;
    let cols = col_labels.len() as i64;
    let rows = row_labels.len() as i64;
    let w = (left + cols * cell_w + 20).max(text_width(title, 2) + 40);
    let h = top + rows * cell_h + 50;
    let mut c = Canvas::new(w as usize, h as usize);
    c.text(20, 14, title, 2, BLACK);
    for (j, s) in col_labels.iter().enumerate() {
        c.text(left + j as i64 * cell_w + (cell_w - text_width(s, 2)) / 2, top - 22, s, 2, BLACK);
    }
    for (i, s) in row_labels.iter().enumerate() {
        let y = top + i as i64 * cell_h;
        c.text(left - 12 - text_width(s, 2), y + (cell_h - 14) / 2, s, 2, BLACK);
        for j in 0..cols as usize {
            let x = left + j as i64 * cell_w;
            let v = values.get(i).and_then(|r| r.get(j)).copied().flatten();
            c.rect(x, y, cell_w, cell_h, WHITE);
            c.rect(x + 1, y + 1, cell_w - 2, cell_h - 2, v.map_or(GREY, red_green));
            if let Some(v) = v {
                let s = format!("{:.0}", v * 100.0);
                c.text(x + (cell_w - text_width(&s, 2)) / 2, y + (cell_h - 14) / 2, &s, 2, BLACK);
            }
        }
    }
    c.text(left, top + rows * cell_h + 16, "SCORE X 100", 2, BLACK);
    c.save(path)
}

/// 5x7 glyphs, one byte per row (bit 4 is the leftmost column). Lower case draws as
/// upper case; unknown characters draw as `?`.
fn glyph(ch: char) -> [u8; 7] {
    match ch.to_ascii_uppercase() {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        'A' => [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'B' => [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E],
        'D' => [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10],
        'G' => [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F],
        'H' => [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'J' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C],
        'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'Q' => [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A],
        'X' => [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11],
        'Y' => [0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04],
        'Z' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F],
        ' ' => [0; 7],
        '.' => [0, 0, 0, 0, 0, 0x0C, 0x0C],
        ',' => [0, 0, 0, 0, 0x0C, 0x04, 0x08],
        ':' => [0, 0x0C, 0x0C, 0, 0x0C, 0x0C, 0],
        '-' => [0, 0, 0, 0x1F, 0, 0, 0],
        '+' => [0, 0x04, 0x04, 0x1F, 0x04, 0x04, 0],
        '/' => [0, 0x01, 0x02, 0x04, 0x08, 0x10, 0],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        '=' => [0, 0, 0x1F, 0, 0x1F, 0, 0],
        '_' => [0, 0, 0, 0, 0, 0, 0x1F],
        '\'' => [0x0C, 0x04, 0x08, 0, 0, 0, 0],
        '[' => [0x0E, 0x08, 0x08, 0x08, 0x08, 0x08, 0x0E],
        ']' => [0x0E, 0x02, 0x02, 0x02, 0x02, 0x02, 0x0E],
        '<' => [0x02, 0x04, 0x08, 0x10, 0x08, 0x04, 0x02],
        '>' => [0x08, 0x04, 0x02, 0x01, 0x02, 0x04, 0x08],
        _ => [0x0E, 0x11, 0x01, 0x02, 0x04, 0, 0x04],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png_info(path: &Path) -> (u32, u32, Vec<u8>) {
        let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).expect("open")));
        let mut reader = dec.read_info().expect("valid PNG header");
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).expect("valid PNG data");
        buf.truncate(info.buffer_size());
        (info.width, info.height, buf)
    }

    fn tmp(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("duo-plot-{}-{name}", std::process::id()))
    }

    #[test]
    fn score_grid_is_a_png_of_the_expected_size_with_coloured_cells() {
        let path = tmp("grid.png");
        let rows: Vec<String> = ["0.1", "0.5", "0.9"].iter().map(|s| s.to_string()).collect();
        let cols: Vec<String> = ["1000", "2000"].iter().map(|s| s.to_string()).collect();
        let values = vec![vec![Some(1.0), Some(0.0)], vec![None, Some(0.5)], vec![Some(1.0), Some(1.0)]];
        score_grid(&path, "TEST", &rows, &cols, &values).expect("grid");
        let (w, h, px) = png_info(&path);
        let left = 20 + text_width("0.1", 2) + 12;
        assert_eq!(w as i64, (left + 2 * 64 + 20).max(text_width("TEST", 2) + 40));
        assert_eq!(h as i64, 70 + 3 * 36 + 50);
        // The top-left cell's corner (inside the border, away from the label) is green, the next red.
        let at = |x: i64, y: i64| -> [u8; 3] {
            let i = ((y * w as i64 + x) * 3) as usize;
            [px[i], px[i + 1], px[i + 2]]
        };
        assert_eq!(at(left + 3, 70 + 3), red_green(1.0));
        assert_eq!(at(left + 64 + 3, 70 + 3), red_green(0.0));
        assert_eq!(at(left + 3, 70 + 36 + 3), GREY);
        std::fs::remove_file(&path).ok();
    }

    #[test]
    fn line_chart_and_gate_heatmap_are_valid_pngs() {
        let path = tmp("line.png");
        let s = [Series { name: "a".into(), points: vec![(0.0, 1.0), (1.0, 0.5), (2.0, 0.25)] }];
        line_chart(&path, "T", "X", "Y", &s).expect("chart");
        assert_eq!(png_info(&path).0, 900);
        let path2 = tmp("gates.png");
        let pattern = HeadPattern::all_retrieval(3, 2);
        gate_heatmap(&path2, &[vec![0.0, 1.0], vec![0.5, 0.5], vec![1.0, 0.0]], &pattern).expect("heatmap");
        let (_, h, _) = png_info(&path2);
        assert_eq!(h as i64, 60 + 3 * 18 + 30);
        std::fs::remove_file(&path).ok();
        std::fs::remove_file(&path2).ok();
    }

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        let t = ticks(0.0, 1.0);
        assert_eq!(t.len(), 6);
        assert!((t[1] - 0.2).abs() < 1e-12 && (t[5] - 1.0).abs() < 1e-12);
        let t = ticks(1000.0, 8000.0);
        assert_eq!(t.first(), Some(&2000.0));
        assert_eq!(label(0.25), "0.25");
        assert_eq!(label(2000.0), "2000");
    }
}
