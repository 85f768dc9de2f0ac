//! HTML report: one self-contained file (inline CSS and SVG, no script, nothing fetched), so it can be
//! kept as a CI artifact and opened anywhere offline.

use std::fmt::Write;
use std::time::Duration;

use anyhow::Result;
use plotters::prelude::*;
use similar::{ChangeTag, TextDiff};

use super::{Report, SampleReport, Summary, Verdict};
use crate::compare::CompareReport;
use crate::finding::{Finding, Severity};

/// A long, unrelated generation must not stall the report: past this, `similar` approximates the diff.
const DIFF_TIMEOUT: Duration = Duration::from_millis(200);
const PLOT_SIZE: (u32, u32) = (760, 320);
const FONT: &str = "sans-serif";
const GREEN: RGBColor = RGBColor(46, 160, 67);
const RED: RGBColor = RGBColor(207, 34, 46);
const BLUE: RGBColor = RGBColor(9, 105, 218);
const ORANGE: RGBColor = RGBColor(188, 76, 0);
const GREY: RGBColor = RGBColor(110, 119, 129);

/// The report of one run (one adapter).
pub fn render(r: &Report) -> Result<String> {
    render_all(std::slice::from_ref(r))
}

/// The reports of several adapters on one page (one section each).
pub fn render_all(reports: &[Report]) -> Result<String> {
    let mut body = String::new();
    for r in reports {
        body.push_str(&report_section(r)?);
    }
    let title = match reports {
        [r] => format!("glm4-verify: {} — {}", r.verdict.as_str(), r.adapter.path),
        _ => format!("glm4-verify: {} adapters", reports.len()),
    };
    Ok(page(&title, &body))
}

/// `glm4-verify compare`: checkpoint table, best pick, metric and loss plots, then each checkpoint's report.
pub fn render_compare(c: &CompareReport) -> Result<String> {
    let mut o = String::new();
    let (verdict, headline, cause) = match &c.best {
        Some(b) => (Verdict::Pass, format!("best: {}{}", b.path, step_suffix(b.step)), b.why.as_str()),
        None => (Verdict::Fail, "no checkpoint passes".to_string(), "every checkpoint failed a gate; see each below"),
    };
    let _ = write!(
        o,
        "<header class=\"top v-{v}\">{badge}<h1>{h}</h1><p class=\"cause\">{cause}</p>\
         <p class=\"meta\">{n} checkpoint(s), base model loaded {loads} time(s)</p></header>",
        v = verdict.as_str(),
        badge = badge(verdict),
        h = esc(&headline),
        cause = esc(cause),
        n = c.checkpoints.len(),
        loads = c.model_loads,
    );

    o.push_str(
        "<section><h2>Checkpoints</h2><table class=\"num\"><thead><tr><th>step</th><th>verdict</th>\
         <th>answer gain / token</th><th>improved</th><th>similarity</th><th>identical to base</th>\
         <th>train loss</th><th>path</th></tr></thead><tbody>",
    );
    for ch in &c.checkpoints {
        let s = &ch.summary;
        let best = c.best.as_ref().is_some_and(|b| b.path == ch.path && b.step == ch.step);
        let _ = write!(
            o,
            "<tr class=\"checkpoint{}\"><td>{}</td><td>{}</td><td>{:+.3}</td><td>{:.0}%</td><td>{:.2}</td>\
             <td>{:.0}%</td><td>{}</td><td class=\"path\">{}</td></tr>",
            if best { " best" } else { "" },
            ch.step.map_or("–".into(), |s| s.to_string()),
            badge(ch.verdict),
            s.mean_answer_gain_per_token,
            s.improved_fraction * 100.0,
            s.mean_similarity_tuned,
            s.identical_generation_fraction * 100.0,
            ch.train_loss.map_or("–".into(), |l| format!("{l:.4}")),
            esc(&ch.path),
        );
    }
    o.push_str("</tbody></table></section>");

    o.push_str("<section><h2>Plots</h2>");
    match checkpoint_plot(c)? {
        Some(svg) => figure(
            &mut o,
            &svg,
            "Mean answer-token log-prob gain per token (left axis) and generation similarity to the target \
             (right axis) per checkpoint; the best checkpoint is circled.",
        ),
        None => o.push_str("<p class=\"none\">No checkpoints to plot.</p>"),
    }
    match loss_plot(c)? {
        Some(svg) => figure(
            &mut o,
            &svg,
            "Training loss (trainer_state.json); dots mark the compared checkpoints, the best one circled.",
        ),
        None => o.push_str("<p class=\"none\">No training loss logged (no trainer_state.json found).</p>"),
    }
    o.push_str("</section>");

    o.push_str("<section><h2>Checkpoint reports</h2>");
    for r in &c.reports {
        let best = c.best.as_ref().is_some_and(|b| b.path == r.adapter.path);
        let _ = write!(
            o,
            "<details{}><summary>{} <span class=\"path\">{}</span></summary>{}</details>",
            if best { " open" } else { "" },
            badge(r.verdict),
            esc(&r.adapter.path),
            report_section(r)?,
        );
    }
    o.push_str("</section>");
    Ok(page(&format!("glm4-verify compare: {headline}"), &o))
}

fn step_suffix(step: Option<u64>) -> String {
    step.map_or(String::new(), |s| format!(" (step {s})"))
}

/// Verdict, findings, summary, gain histogram and samples of one report.
fn report_section(r: &Report) -> Result<String> {
    let mut o = String::new();
    let a = &r.adapter;
    let adapter = match a.kind.as_str() {
        "lora" => format!(
            "LoRA r={} alpha={} scaling={}; {} modules matched, {} tensors",
            a.rank.map_or("?".into(), |x| x.to_string()),
            a.alpha.map_or("?".into(), |x| x.to_string()),
            a.scaling.map_or("?".into(), |x| format!("{x:.3}")),
            a.matched_modules,
            a.tensors
        ),
        _ => "merged model directory".to_string(),
    };
    let _ = write!(
        o,
        "<article class=\"report\"><header class=\"top v-{v}\">{badge}<h1 class=\"path\">{path}</h1>\
         <p class=\"cause\">{cause}</p><p class=\"meta\">base {base} ({layout}) · adapter {adapter} · {t:.1} s</p>",
        v = r.verdict.as_str(),
        badge = badge(r.verdict),
        path = esc(&a.path),
        cause = esc(&r.cause),
        base = esc(&r.base.path),
        layout = esc(&r.base.layout),
        adapter = esc(&adapter),
        t = r.timings.total_s,
    );
    if let Some(n) = &a.note {
        let _ = write!(o, "<p class=\"meta\">note: {}</p>", esc(n));
    }
    o.push_str("</header>");

    o.push_str("<section><h2>Findings</h2>");
    findings(&mut o, &r.findings);
    o.push_str("</section><section><h2>Summary</h2>");
    summary(&mut o, &r.summary);
    o.push_str("</section><section><h2>Log-prob gain per sample</h2>");
    match gain_histogram(&r.samples)? {
        Some(svg) => figure(
            &mut o,
            &svg,
            "Per-sample log-prob gain per target token, (log p tuned − log p base) / target tokens; \
             right of the dashed line the fine-tune made the target more likely.",
        ),
        None => o.push_str("<p class=\"none\">No sample with target tokens to plot.</p>"),
    }
    let _ = write!(o, "</section><section><h2>Samples ({})</h2>", r.samples.len());
    samples(&mut o, &r.samples);
    let run = serde_json::to_string_pretty(&r.run)?;
    let _ = write!(
        o,
        "</section><details class=\"run\"><summary>Run</summary><pre>{}</pre></details></article>",
        esc(&run)
    );
    Ok(o)
}

fn findings(o: &mut String, fs: &[Finding]) {
    if fs.is_empty() {
        o.push_str("<p class=\"none\">No findings.</p>");
        return;
    }
    o.push_str(
        "<table class=\"findings\"><thead><tr><th>severity</th><th>code</th><th>message</th></tr></thead><tbody>",
    );
    for f in fs {
        let sev = match f.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Info => "info",
        };
        let _ = write!(
            o,
            "<tr class=\"finding\"><td><span class=\"sev sev-{sev}\">{sev}</span></td>\
             <td><code>{}</code></td><td>{}</td></tr>",
            esc(&f.code),
            esc(&f.message)
        );
    }
    o.push_str("</tbody></table>");
}

fn summary(o: &mut String, s: &Summary) {
    let row = |o: &mut String, name: &str, base: f64, tuned: f64, digits: usize| {
        let _ = write!(
            o,
            "<tr><th>{name}</th><td>{base:.digits$}</td><td>{tuned:.digits$}</td>\
             <td class=\"{}\">{:+.digits$}</td></tr>",
            if tuned > base {
                "up"
            } else if tuned < base {
                "down"
            } else {
                ""
            },
            tuned - base
        );
    };
    o.push_str(
        "<table class=\"num summary\"><thead><tr><th>metric</th><th>base</th><th>tuned</th><th>change</th></tr>\
         </thead><tbody>",
    );
    row(o, "log p per target token", s.mean_logprob_per_token_base, s.mean_logprob_per_token_tuned, 3);
    row(o, "generation similarity to target", s.mean_similarity_base, s.mean_similarity_tuned, 2);
    o.push_str("</tbody></table><dl class=\"stats\">");
    let stats = [
        ("samples", s.samples.to_string()),
        ("target tokens", s.target_tokens.to_string()),
        ("answer tokens", s.answer_tokens.to_string()),
        ("answer-token gain / token", format!("{:+.3}", s.mean_answer_gain_per_token)),
        ("median token gain", format!("{:+.3}", s.median_token_gain)),
        ("samples improved", format!("{:.0}%", s.improved_fraction * 100.0)),
        ("target tokens gained", format!("{:.0}%", s.token_gain_fraction * 100.0)),
        ("generations identical to base", format!("{:.0}%", s.identical_generation_fraction * 100.0)),
    ];
    for (k, v) in stats {
        let _ = write!(o, "<div><dt>{k}</dt><dd>{v}</dd></div>");
    }
    o.push_str("</dl>");
}

/// (log p tuned − log p base) per target token; None for samples with no target tokens.
fn gain_per_token(s: &SampleReport) -> Option<f64> {
    let g = (s.logprob_tuned - s.logprob_base) / s.target_tokens as f64;
    (s.target_tokens > 0 && g.is_finite()).then_some(g)
}

fn samples(o: &mut String, ss: &[SampleReport]) {
    o.push_str(
        "<p class=\"legend\">Generations are diffed against the target character by character: \
         <ins>generated, not in the target</ins> <del>in the target, not generated</del></p>\
         <table class=\"samples\"><colgroup><col class=\"info\"><col><col><col></colgroup>\
         <thead><tr><th>sample</th><th>target</th><th>base generation</th><th>tuned generation</th></tr>\
         </thead><tbody>",
    );
    for (i, s) in ss.iter().enumerate() {
        let gain = gain_per_token(s);
        let _ = write!(
            o,
            "<tr class=\"sample{}\"><td class=\"info\"><b>#{}</b> <span class=\"path\">{}:{}</span><br>\
             {} target tokens<br>gain {}<br>similarity {:.2} → {:.2}</td>\
             <td class=\"text\">{}</td><td class=\"text\">{}</td><td class=\"text\">{}</td></tr>",
            if gain.is_some_and(|g| g < 0.0) { " worse" } else { "" },
            i + 1,
            esc(&s.source),
            s.line,
            s.target_tokens,
            gain.map_or("–".into(), |g| format!("{g:+.3}/token")),
            s.similarity_base,
            s.similarity_tuned,
            esc(&s.target),
            diff(&s.target, &s.generation_base),
            diff(&s.target, &s.generation_tuned),
        );
    }
    o.push_str("</tbody></table>");
}

/// `generation` with what differs from `target` marked: `<ins>` extra text, `<del>` missing target text.
fn diff(target: &str, generation: &str) -> String {
    let d = TextDiff::configure().timeout(DIFF_TIMEOUT).diff_chars(target, generation);
    // Runs of one tag; adjacent runs always differ in tag, so an inner equal run sits between changes.
    let mut runs: Vec<(ChangeTag, String)> = Vec::new();
    for c in d.iter_all_changes() {
        match runs.last_mut() {
            Some((tag, text)) if *tag == c.tag() => text.push_str(c.value()),
            _ => runs.push((c.tag(), c.value().to_string())),
        }
    }
    let (mut out, mut del, mut ins) = (String::new(), String::new(), String::new());
    let flush = |out: &mut String, del: &mut String, ins: &mut String| {
        if !del.is_empty() {
            let _ = write!(out, "<del>{}</del>", esc(del));
        }
        if !ins.is_empty() {
            let _ = write!(out, "<ins>{}</ins>", esc(ins));
        }
        del.clear();
        ins.clear();
    };
    let last = runs.len().saturating_sub(1);
    for (i, (tag, text)) in runs.iter().enumerate() {
        // A char diff of unrelated texts matches stray single characters; folding such 1–2 char islands
        // into the surrounding change keeps it one readable replacement instead of confetti.
        let island = *tag == ChangeTag::Equal && i > 0 && i < last && text.chars().count() <= 2;
        match tag {
            ChangeTag::Equal if !island => {
                flush(&mut out, &mut del, &mut ins);
                out.push_str(&esc(text));
            }
            ChangeTag::Equal => {
                del.push_str(text);
                ins.push_str(text);
            }
            ChangeTag::Delete => del.push_str(text),
            ChangeTag::Insert => ins.push_str(text),
        }
    }
    flush(&mut out, &mut del, &mut ins);
    if generation.is_empty() {
        out.push_str("<span class=\"none\"> (empty generation)</span>");
    }
    out
}

fn badge(v: Verdict) -> String {
    format!("<span class=\"badge v-{0}\">{0}</span>", v.as_str())
}

fn figure(o: &mut String, svg: &str, caption: &str) {
    let _ = write!(o, "<figure>{svg}<figcaption>{}</figcaption></figure>", esc(caption));
}

/// Escapes text for HTML element content and quoted attribute values.
fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// A range around `lo..hi` with some margin, never empty (plotters needs a non-zero span).
fn padded(lo: f64, hi: f64) -> std::ops::Range<f64> {
    let span = hi - lo;
    let pad = if span > 1e-9 { span * 0.08 } else { lo.abs().max(1.0) * 0.5 };
    (lo - pad)..(hi + pad)
}

fn gain_histogram(ss: &[SampleReport]) -> Result<Option<String>> {
    let gains: Vec<f64> = ss.iter().filter_map(gain_per_token).collect();
    if gains.is_empty() {
        return Ok(None);
    }
    // Bins on a grid through 0, so every bar lies wholly on one side of "no change" and its colour is honest.
    let lo = gains.iter().copied().fold(0.0, f64::min);
    let hi = gains.iter().copied().fold(0.0, f64::max);
    let width = (hi - lo).max(0.1) / ((gains.len() as f64).sqrt().ceil()).clamp(10.0, 40.0);
    let first = (lo / width).floor() as i64;
    let bins = ((hi / width).floor() as i64 - first + 1).max(1) as usize;
    let mut counts = vec![0u32; bins];
    for g in &gains {
        counts[((((g / width).floor() as i64) - first).max(0) as usize).min(bins - 1)] += 1;
    }
    let start = first as f64 * width;
    let x = (start - width / 2.0)..(start + (bins as f64 + 0.5) * width);
    let top = counts.iter().copied().max().unwrap_or(0) + 1;

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, PLOT_SIZE).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(52)
            .build_cartesian_2d(x.clone(), 0u32..top)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_desc("log-prob gain per target token (nats)")
            .y_desc("samples")
            .x_label_formatter(&|v| format!("{v:.2}"))
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 14))
            .draw()?;
        chart.draw_series(counts.iter().enumerate().filter(|(_, &n)| n > 0).map(|(i, &n)| {
            let x0 = start + i as f64 * width;
            let colour = if x0 < 0.0 { RED } else { GREEN };
            Rectangle::new([(x0, 0), (x0 + width, n)], colour.mix(0.75).filled())
        }))?;
        chart.draw_series(DashedLineSeries::new([(0.0, 0), (0.0, top)], 5, 4, GREY.stroke_width(2)))?;
        root.present()?;
    }
    Ok(Some(svg))
}

/// X position of each checkpoint: its step when all have one, else its position in the list.
fn checkpoint_xs(c: &CompareReport) -> (Vec<f64>, bool) {
    let steps: Option<Vec<f64>> = c.checkpoints.iter().map(|ch| ch.step.map(|s| s as f64)).collect();
    match steps {
        Some(s) => (s, true),
        None => ((1..=c.checkpoints.len()).map(|i| i as f64).collect(), false),
    }
}

/// The shared x range of both compare plots, so they line up one above the other.
fn step_range(c: &CompareReport) -> std::ops::Range<f64> {
    let (xs, by_step) = checkpoint_xs(c);
    let loss = c.loss_curve.iter().map(|(s, _)| *s as f64).filter(|_| by_step);
    let all: Vec<f64> = xs.into_iter().chain(loss).collect();
    let lo = all.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = all.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    padded(lo, hi)
}

fn best_index(c: &CompareReport) -> Option<usize> {
    let b = c.best.as_ref()?;
    c.checkpoints.iter().position(|ch| ch.path == b.path && ch.step == b.step)
}

fn checkpoint_plot(c: &CompareReport) -> Result<Option<String>> {
    if c.checkpoints.is_empty() {
        return Ok(None);
    }
    let (xs, by_step) = checkpoint_xs(c);
    let gains: Vec<(f64, f64)> =
        xs.iter().zip(&c.checkpoints).map(|(&x, ch)| (x, ch.summary.mean_answer_gain_per_token)).collect();
    let sims: Vec<(f64, f64)> =
        xs.iter().zip(&c.checkpoints).map(|(&x, ch)| (x, ch.summary.mean_similarity_tuned)).collect();
    let finite = gains.iter().map(|p| p.1).filter(|g| g.is_finite());
    let (lo, hi) = finite.fold((0.0f64, 0.0f64), |(lo, hi), g| (lo.min(g), hi.max(g)));
    let y = padded(lo, hi);

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, PLOT_SIZE).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(60)
            .right_y_label_area_size(60)
            .build_cartesian_2d(step_range(c), y.clone())?
            .set_secondary_coord(step_range(c), 0.0..1.05);
        chart
            .configure_mesh()
            .x_desc(if by_step { "training step" } else { "checkpoint (in the order given)" })
            .y_desc("answer gain / token (nats)")
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| format!("{v:+.2}"))
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 14))
            .draw()?;
        chart
            .configure_secondary_axes()
            .y_desc("generation similarity")
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 14))
            .draw()?;
        let x = step_range(c);
        chart.draw_series(DashedLineSeries::new([(x.start, 0.0), (x.end, 0.0)], 5, 4, GREY.stroke_width(1)))?;
        chart
            .draw_series(LineSeries::new(gains.clone(), BLUE.stroke_width(2)).point_size(4))?
            .label("answer gain / token")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], BLUE.stroke_width(2)));
        chart
            .draw_secondary_series(LineSeries::new(sims.clone(), ORANGE.stroke_width(2)).point_size(4))?
            .label("similarity")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], ORANGE.stroke_width(2)));
        if let Some(i) = best_index(c) {
            chart.draw_series([Circle::new(gains[i], 9, BLUE.stroke_width(2))])?;
            chart.draw_secondary_series([Circle::new(sims[i], 9, ORANGE.stroke_width(2))])?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(GREY)
            .label_font((FONT, 13))
            .draw()?;
        root.present()?;
    }
    Ok(Some(svg))
}

fn loss_plot(c: &CompareReport) -> Result<Option<String>> {
    let finite = c.loss_curve.iter().map(|p| p.1).filter(|l| l.is_finite());
    let (lo, hi) = finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), l| (lo.min(l), hi.max(l)));
    if lo > hi {
        return Ok(None);
    }
    let (xs, by_step) = checkpoint_xs(c);
    // Dots only where the checkpoint's x is its step: list positions mean nothing on a step axis.
    let marks: Vec<(f64, f64)> = if by_step {
        xs.iter().zip(&c.checkpoints).filter_map(|(&x, ch)| Some((x, ch.train_loss?))).collect()
    } else {
        Vec::new()
    };
    let curve: Vec<(f64, f64)> = c.loss_curve.iter().map(|&(s, l)| (s as f64, l)).collect();
    let x = if by_step { step_range(c) } else { padded(curve[0].0, curve[curve.len() - 1].0) };

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, PLOT_SIZE).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(60)
            // Where the gain plot has its similarity axis: both plot areas span the same pixels.
            .margin_right(12 + 60)
            .build_cartesian_2d(x, padded(lo.min(0.0), hi))?;
        chart
            .configure_mesh()
            .x_desc("training step")
            .y_desc("training loss")
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| format!("{v:.2}"))
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 14))
            .draw()?;
        chart.draw_series(LineSeries::new(curve, RED.stroke_width(2)))?;
        chart.draw_series(marks.iter().map(|&p| Circle::new(p, 4, RED.filled())))?;
        if let Some(p) = best_index(c).filter(|_| by_step).and_then(|i| Some((xs[i], c.checkpoints[i].train_loss?))) {
            chart.draw_series([Circle::new(p, 9, RED.stroke_width(2))])?;
        }
        root.present()?;
    }
    Ok(Some(svg))
}

fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">\
         <title>{}</title><style>{CSS}</style></head>\n<body>{body}\n<footer>glm4-verify {}</footer></body></html>\n",
        esc(title),
        env!("CARGO_PKG_VERSION")
    )
}

// The Content-Security-Policy above blocks every script and fetch: the page must work as plain HTML + CSS,
// and an escaping bug could not run anything.
const CSS: &str = r#"
:root{--pass:#1a7f37;--bad:#cf222e;--warn:#9a6700;--muted:#656d76;--line:#d0d7de;--bg2:#f6f8fa}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Noto Sans","Noto Sans CJK SC","PingFang SC",
 "Microsoft YaHei",sans-serif;
 color:#1f2328;margin:0 auto;padding:16px 24px;max-width:1400px}
h1{font-size:20px;margin:0;display:inline;vertical-align:middle;word-break:break-all}
h2{font-size:16px;margin:24px 0 8px;border-bottom:1px solid var(--line);padding-bottom:4px}
header.top{border-left:6px solid var(--bad);background:var(--bg2);padding:12px 16px;border-radius:6px}
header.top.v-pass{border-left-color:var(--pass)}
.cause{font-size:15px;margin:8px 0 4px}
.meta{color:var(--muted);margin:2px 0;font-size:13px}
.badge{display:inline-block;padding:2px 10px;border-radius:12px;color:#fff;background:var(--bad);font-weight:600;
 text-transform:uppercase;font-size:13px;vertical-align:middle;margin-right:10px;white-space:nowrap}
.badge.v-pass{background:var(--pass)}
.badge.v-no_effect,.badge.v-incomplete{background:var(--warn)}
header.top.v-incomplete{border-left-color:var(--warn)}
table{border-collapse:collapse;margin:4px 0}
th,td{border:1px solid var(--line);padding:4px 8px;text-align:left;vertical-align:top}
thead th{background:var(--bg2)}
table.num td{text-align:right;font-variant-numeric:tabular-nums}
table.num td.path,table.num td:nth-child(2){text-align:left}
table.summary tbody th{font-weight:normal}
td.up{color:var(--pass)}
td.down{color:var(--bad)}
tr.best td{background:#dafbe1;font-weight:600}
.sev{font-weight:600;text-transform:uppercase;font-size:12px}
.sev-error{color:var(--bad)}
.sev-warning{color:var(--warn)}
.sev-info{color:var(--muted)}
dl.stats{display:flex;flex-wrap:wrap;gap:8px;margin:8px 0}
dl.stats div{background:var(--bg2);border:1px solid var(--line);border-radius:6px;padding:4px 10px}
dt{color:var(--muted);font-size:12px}
dd{margin:0;font-weight:600;font-variant-numeric:tabular-nums}
figure{margin:8px 0}
figure svg{width:100%;max-width:760px;height:auto;display:block}
figcaption{color:var(--muted);font-size:13px;max-width:760px}
table.samples{width:100%;table-layout:fixed}
table.samples col.info{width:170px}
td.info{font-size:12px;color:var(--muted)}
td.info b{color:#1f2328}
tr.worse td.info{border-left:4px solid var(--bad)}
td.text{white-space:pre-wrap;overflow-wrap:anywhere;font-family:ui-monospace,"SFMono-Regular",Menlo,Consolas,
 "Noto Sans Mono CJK SC",monospace;font-size:13px}
ins{background:#aceebb;text-decoration:none}
del{background:#ffcecb;color:#82071e}
.legend ins,.legend del{padding:0 3px}
.none{color:var(--muted);font-style:italic}
.path{word-break:break-all}
details{margin:8px 0}
details>summary{cursor:pointer;padding:4px 0}
details.run pre{background:var(--bg2);padding:8px;overflow:auto;font-size:12px}
article.report{margin-bottom:32px}
details>article.report{margin:4px 0 16px 8px;padding-left:16px;border-left:3px solid var(--line)}
footer{color:var(--muted);font-size:12px;margin-top:32px}
"#;
