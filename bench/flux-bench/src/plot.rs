//! SVG plots of a matrix (`flux-bench run --plots DIR`): the median rate of each row with its
//! single runs, and the chunk-latency distribution of each row that records chunk times
//! (the median run's). Text is left to the viewer's sans-serif font: no font files needed.

use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;

use crate::{Matrix, RunResult};

/// Writes `throughput.svg` and `chunk-latency.svg` into `dir`.
pub fn draw(m: &Matrix, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    throughput(m, &dir.join("throughput.svg"))?;
    latency(m, &dir.join("chunk-latency.svg"))?;
    Ok(())
}

fn caption(m: &Matrix) -> String {
    format!(
        "{} MiB, {}, {} cores, median of {}",
        m.size_bytes >> 20,
        m.path,
        m.cores,
        m.rows.iter().map(|r| r.runs.len()).max().unwrap_or(0)
    )
}

fn throughput(m: &Matrix, path: &Path) -> Result<()> {
    let rows: Vec<(&str, f64, Vec<f64>)> = m
        .rows
        .iter()
        .filter_map(|r| {
            let runs = r.runs.iter().map(|x| x.gbit_s).collect();
            Some((r.label.as_str(), r.median_gbit_s?, runs))
        })
        .collect();
    if rows.is_empty() {
        return Ok(());
    }
    let top = rows
        .iter()
        .flat_map(|r| r.2.iter().copied().chain([r.1]))
        .fold(0.0f64, f64::max)
        * 1.1;
    let n = rows.len();
    let height = 90 + 36 * n as u32;
    let root = SVGBackend::new(path, (960, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("Rate per row, Gbit/s ({})", caption(m)),
            ("sans-serif", 16),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(300)
        .build_cartesian_2d(0.0..top.max(0.1), (0..n).into_segmented())?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(n)
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => rows.get(*i).map_or(String::new(), |r| r.0.to_owned()),
            _ => String::new(),
        })
        .x_desc("Gbit/s (bar: median; dots: each run)")
        .draw()?;
    chart.draw_series(rows.iter().enumerate().map(|(i, r)| {
        let mut bar = Rectangle::new(
            [
                (0.0, SegmentValue::Exact(i)),
                (r.1, SegmentValue::Exact(i + 1)),
            ],
            Palette99::pick(i).mix(0.7).filled(),
        );
        bar.set_margin(6, 6, 0, 0);
        bar
    }))?;
    chart.draw_series(rows.iter().enumerate().flat_map(|(i, r)| {
        r.2.iter()
            .map(move |&v| Circle::new((v, SegmentValue::CenterOf(i)), 3, BLACK.filled()))
    }))?;
    root.present()?;
    Ok(())
}

/// The run whose rate is the row's median (the middle one of the sorted runs).
fn median_run(runs: &[RunResult]) -> Option<&RunResult> {
    let mut v: Vec<&RunResult> = runs.iter().collect();
    v.sort_by(|a, b| a.gbit_s.total_cmp(&b.gbit_s));
    v.get(v.len() / 2).copied()
}

fn latency(m: &Matrix, path: &Path) -> Result<()> {
    let series: Vec<(&str, Vec<(f64, f64)>)> = m
        .rows
        .iter()
        .filter_map(|r| {
            let run = median_run(&r.runs)?;
            // A log axis has no zero: the histogram's resolution is 1 µs.
            let pts = run
                .latency_cdf_ms
                .iter()
                .map(|&(q, ms)| (ms.max(0.001), q))
                .collect::<Vec<_>>();
            (!pts.is_empty()).then_some((r.label.as_str(), pts))
        })
        .collect();
    if series.is_empty() {
        return Ok(());
    }
    let (lo, hi) = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.0))
        .fold((f64::MAX, 0.0f64), |(lo, hi), x| (lo.min(x), hi.max(x)));
    let root = SVGBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("Chunk latency, host sent to joiner wrote ({})", caption(m)),
            ("sans-serif", 16),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d((lo * 0.8..hi * 1.25).log_scale(), 0.0..1.0)?;
    chart
        .configure_mesh()
        .x_desc("ms (log scale)")
        .y_desc("share of chunks at or below")
        .draw()?;
    for (i, (label, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i);
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?
            .label(*label)
            .legend(move |(x, y)| {
                PathElement::new(
                    vec![(x, y), (x + 20, y)],
                    Palette99::pick(i).stroke_width(2),
                )
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
