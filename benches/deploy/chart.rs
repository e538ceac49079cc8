//! A small PNG bar chart drawn by hand (no system fonts needed): an RGB canvas, rectangles, and
//! text in a built-in 5×7 bitmap font, encoded with the `png` crate.

use std::io;
use std::path::Path;

pub type Rgb = [u8; 3];

pub const BLACK: Rgb = [20, 20, 20];
pub const GRID: Rgb = [225, 225, 225];
pub const AXIS: Rgb = [120, 120, 120];
pub const FLIP: Rgb = [31, 119, 180];
pub const RSYNC: Rgb = [255, 127, 14];
pub const BOUND: Rgb = [110, 170, 90];

pub struct Canvas {
    pub w: usize,
    pub h: usize,
    px: Vec<u8>,
}

impl Canvas {
    pub fn new(w: usize, h: usize) -> Canvas {
        Canvas {
            w,
            h,
            px: vec![255; w * h * 3],
        }
    }

    pub fn rect(&mut self, x: i64, y: i64, w: i64, h: i64, c: Rgb) {
        let (x0, y0) = (x.max(0) as usize, y.max(0) as usize);
        let x1 = ((x + w).max(0) as usize).min(self.w);
        let y1 = ((y + h).max(0) as usize).min(self.h);
        for yy in y0..y1 {
            for xx in x0..x1 {
                let i = (yy * self.w + xx) * 3;
                self.px[i..i + 3].copy_from_slice(&c);
            }
        }
    }

    /// Text at (x, y) = top-left, each font pixel `scale`×`scale`. Lowercase is drawn as
    /// uppercase; unknown characters as a box.
    pub fn text(&mut self, x: i64, y: i64, s: &str, scale: i64, c: Rgb) {
        let mut cx = x;
        for ch in s.chars() {
            let rows = glyph(ch.to_ascii_uppercase());
            for (ry, row) in rows.iter().enumerate() {
                for rx in 0..5 {
                    if row & (0x10 >> rx) != 0 {
                        self.rect(cx + rx * scale, y + ry as i64 * scale, scale, scale, c);
                    }
                }
            }
            cx += 6 * scale;
        }
    }

    pub fn text_width(s: &str, scale: i64) -> i64 {
        s.chars().count() as i64 * 6 * scale - scale
    }

    /// Text centred horizontally on `cx`.
    pub fn text_centered(&mut self, cx: i64, y: i64, s: &str, scale: i64, c: Rgb) {
        let w = Canvas::text_width(s, scale);
        self.text(cx - w / 2, y, s, scale, c);
    }

    pub fn save(&self, path: &Path) -> io::Result<()> {
        let file = std::fs::File::create(path)?;
        let mut enc = png::Encoder::new(io::BufWriter::new(file), self.w as u32, self.h as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_compression(png::Compression::Best);
        let mut writer = enc.write_header().map_err(io::Error::other)?;
        writer
            .write_image_data(&self.px)
            .map_err(io::Error::other)?;
        writer.finish().map_err(io::Error::other)
    }
}

/// One group of bars (a scenario) in a panel.
pub struct Group {
    pub label: String,
    /// (value, colour, label above the bar); a missing value draws "N/A".
    pub bars: Vec<(Option<f64>, Rgb, String)>,
}

/// A bar-chart panel: title, y axis (linear from 0, or log10), groups of bars.
pub struct Panel {
    pub title: String,
    pub unit: String,
    pub log: bool,
    pub groups: Vec<Group>,
}

/// Draws `panel` into the rectangle (x, y, w, h) of the canvas.
pub fn draw_panel(cv: &mut Canvas, p: &Panel, x: i64, y: i64, w: i64, h: i64) {
    cv.text(x + 10, y + 6, &p.title, 2, BLACK);
    let (left, top, bottom) = (x + 110, y + 36, y + h - 40);
    let right = x + w - 10;
    let values: Vec<f64> = p
        .groups
        .iter()
        .flat_map(|g| g.bars.iter().filter_map(|b| b.0))
        .filter(|v| *v > 0.0)
        .collect();
    let max = values.iter().cloned().fold(0.0f64, f64::max).max(1e-9);
    let (lo, hi) = if p.log {
        let min = values.iter().cloned().fold(f64::INFINITY, f64::min);
        let lo = if min.is_finite() {
            min.log10().floor()
        } else {
            0.0
        };
        (lo, max.log10().ceil().max(lo + 1.0))
    } else {
        (0.0, nice_ceiling(max * 1.1))
    };
    let to_y = |v: f64| -> i64 {
        let f = if p.log {
            (v.max(10f64.powf(lo)).log10() - lo) / (hi - lo)
        } else {
            (v - lo) / (hi - lo)
        };
        bottom - (f.clamp(0.0, 1.0) * (bottom - top) as f64) as i64
    };
    // Grid and y labels.
    let ticks: Vec<f64> = if p.log {
        (lo as i64..=hi as i64)
            .map(|e| 10f64.powi(e as i32))
            .collect()
    } else {
        (0..=5).map(|i| hi * i as f64 / 5.0).collect()
    };
    for t in ticks {
        let ty = to_y(t);
        cv.rect(left, ty, right - left, 1, GRID);
        let label = if p.log {
            human_bytes(t)
        } else {
            format!("{t:.2}")
        };
        let lw = Canvas::text_width(&label, 2);
        cv.text(left - 8 - lw, ty - 7, &label, 2, AXIS);
    }
    cv.text(x + 10, top - 4 + (bottom - top) / 2 - 40, &p.unit, 2, AXIS);
    cv.rect(left, top, 1, bottom - top, AXIS);
    cv.rect(left, bottom, right - left, 1, AXIS);
    // Bars.
    let n = p.groups.len().max(1) as i64;
    let gw = (right - left) / n;
    for (gi, g) in p.groups.iter().enumerate() {
        let gx = left + gi as i64 * gw;
        let nb = g.bars.len().max(1) as i64;
        let bw = ((gw - 24) / nb).min(80);
        let start = gx + (gw - bw * nb) / 2;
        for (bi, (v, c, label)) in g.bars.iter().enumerate() {
            let bx = start + bi as i64 * bw;
            match v {
                Some(v) => {
                    let ty = to_y(*v);
                    cv.rect(bx + 2, ty, bw - 4, bottom - ty, *c);
                    // Halve the text when it would overlap the next bar's label.
                    let scale = if Canvas::text_width(label, 2) > bw - 2 {
                        1
                    } else {
                        2
                    };
                    cv.text_centered(bx + bw / 2, ty - 9 * scale, label, scale, BLACK);
                }
                None => cv.text_centered(bx + bw / 2, bottom - 18, "N/A", 2, AXIS),
            }
        }
        cv.text_centered(gx + gw / 2, bottom + 10, &g.label, 2, BLACK);
    }
}

/// Legend entries in one row at (x, y).
pub fn legend(cv: &mut Canvas, x: i64, y: i64, items: &[(&str, Rgb)]) {
    let mut cx = x;
    for (name, c) in items {
        cv.rect(cx, y, 20, 14, *c);
        cv.text(cx + 28, y, name, 2, BLACK);
        cx += 28 + Canvas::text_width(name, 2) + 30;
    }
}

fn nice_ceiling(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let e = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if v <= m * e {
            return m * e;
        }
    }
    10.0 * e
}

pub fn human_bytes(b: f64) -> String {
    if b >= 1e9 {
        format!("{:.1}GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1}MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.0}KB", b / 1e3)
    } else {
        format!("{b:.0}B")
    }
}

fn glyph(c: char) -> [u8; 7] {
    match c {
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
        'A' => [0x0E, 0x11, 0x11, 0x11, 0x1F, 0x11, 0x11],
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
        ';' => [0, 0x0C, 0x0C, 0, 0x0C, 0x04, 0x08],
        '/' => [0, 0x01, 0x02, 0x04, 0x08, 0x10, 0],
        '-' => [0, 0, 0, 0x1F, 0, 0, 0],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        '[' => [0x0E, 0x08, 0x08, 0x08, 0x08, 0x08, 0x0E],
        ']' => [0x0E, 0x02, 0x02, 0x02, 0x02, 0x02, 0x0E],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        '=' => [0, 0, 0x1F, 0, 0x1F, 0, 0],
        '_' => [0, 0, 0, 0, 0, 0, 0x1F],
        '<' => [0x02, 0x04, 0x08, 0x10, 0x08, 0x04, 0x02],
        '>' => [0x08, 0x04, 0x02, 0x01, 0x02, 0x04, 0x08],
        '+' => [0, 0x04, 0x04, 0x1F, 0x04, 0x04, 0],
        '*' => [0, 0x04, 0x15, 0x0E, 0x15, 0x04, 0],
        '\'' => [0x0C, 0x04, 0x08, 0, 0, 0, 0],
        '|' => [0x04; 7],
        '#' => [0x0A, 0x0A, 0x1F, 0x0A, 0x1F, 0x0A, 0x0A],
        '~' => [0, 0, 0x08, 0x15, 0x02, 0, 0],
        _ => [0x1F, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1F],
    }
}
