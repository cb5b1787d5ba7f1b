//! Gate heatmaps as PNG: one cell per (layer, KV head), colour by gate value (dark blue
//! at 0 to yellow at 1), with retrieval heads of the binarised pattern outlined in white.
//! Rows are layers (layer 0 at the top), columns KV heads.

use anyhow::{Context, Result};
use duo_core::HeadPattern;
use std::path::Path;

const CELL: usize = 16;

/// A colour ramp close to viridis.
fn colour(v: f32) -> [u8; 3] {
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

/// Writes the heatmap of `gates` (`[layer][head]`) with `pattern` outlined.
pub fn write_gate_heatmap(path: &Path, gates: &[Vec<f32>], pattern: &HeadPattern) -> Result<()> {
    let (rows, cols) = (gates.len(), gates[0].len());
    let (w, h) = (cols * CELL, rows * CELL);
    let mut px = vec![0u8; w * h * 3];
    for (l, row) in gates.iter().enumerate() {
        for (k, &g) in row.iter().enumerate() {
            let c = colour(g);
            let outline = pattern.is_retrieval(l, k);
            for y in 0..CELL {
                for x in 0..CELL {
                    let edge = x == 0 || y == 0 || x == CELL - 1 || y == CELL - 1;
                    let inner_edge = x == 1 || y == 1 || x == CELL - 2 || y == CELL - 2;
                    let p = if edge { [20, 20, 20] } else if outline && inner_edge { [255, 255, 255] } else { c };
                    let i = ((l * CELL + y) * w + k * CELL + x) * 3;
                    px[i..i + 3].copy_from_slice(&p);
                }
            }
        }
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w as u32, h as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.write_header()?.write_image_data(&px)?;
    Ok(())
}
