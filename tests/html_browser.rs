//! The HTML report in a real browser: headless Chromium (Debian's `chromium`) loads the rendered files; the
//! DOM it ends with must show the verdict, the plots and every sample, with no console message at all (the
//! page has no script, so any message is a blocked load, a CSP violation or an injected script).
//!
//! Without /usr/bin/chromium (or $CHROMIUM) the browser part is skipped with a notice and only the
//! structural checks run; set GLM4_VERIFY_REQUIRE_BROWSER=1 (CI) to fail instead. Set
//! GLM4_VERIFY_SCREENSHOT_DIR to also save screenshots of both pages there.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use glm4_verify::compare::{Best, CheckpointResult, CompareReport};
use glm4_verify::finding::Finding;
use glm4_verify::report::{html, AdapterInfo, BaseInfo, Report, SampleReport, Summary, Timings, Verdict};

/// A generation that breaks out of its table cell and runs script if it is not escaped.
const HOSTILE: &str = "</td></tr><script>console.error('xss')</script><img src=x onerror=\"console.error(1)\"> & 'q'";
/// How `HOSTILE`'s markup reads, as text, both in the page and in the browser's DOM serialisation.
const HOSTILE_ESCAPED: &str = "&lt;/td&gt;&lt;/tr&gt;&lt;script&gt;console.error(";
const CHINESE: &str = "北京是中国的首都，人口约两千一百万。";

fn sample(
    line: usize,
    target: &str,
    base: &str,
    tuned: &str,
    tokens: usize,
    lp_base: f64,
    lp_tuned: f64,
) -> SampleReport {
    SampleReport {
        source: "data/train.jsonl".into(),
        line,
        target_tokens: tokens,
        logprob_base: lp_base,
        logprob_tuned: lp_tuned,
        target: target.into(),
        generation_base: base.into(),
        generation_tuned: tuned.into(),
        similarity_base: 0.2,
        similarity_tuned: 0.9,
    }
}

fn report(path: &str, verdict: Verdict, cause: &str, gain: f64) -> Report {
    let samples = vec![
        sample(1, CHINESE, "北京是一座城市。", "北京是中国的首都，人口约两千万。", 12, -30.0, -6.0),
        sample(2, "The answer is 42.", "I am not sure what you mean.", "The answer is 42!", 6, -20.0, -3.0),
        sample(3, "<b>bold</b> & \"quotes\"", HOSTILE, "<b>bold</b> & \"quotes\"", 9, -15.0, -16.5),
        // No target tokens: no point in the histogram, still a table row.
        sample(4, "", "", "", 0, 0.0, 0.0),
    ];
    Report {
        schema_version: 1,
        verdict,
        cause: cause.into(),
        base: BaseInfo { path: "models/glm-4-9b-chat".into(), layout: "hf".into() },
        adapter: AdapterInfo {
            path: path.into(),
            kind: "lora".into(),
            rank: Some(8),
            alpha: Some(16.0),
            scaling: Some(2.0),
            matched_modules: 80,
            tensors: 160,
            note: None,
        },
        findings: vec![
            Finding::warning("data.truncated", format!("2 samples were cut at max_len; one reads {HOSTILE}")),
            Finding::info("train.loss_curve", "loss fell from 2.1 to 0.4"),
        ],
        summary: Summary {
            samples: samples.len(),
            target_tokens: 27,
            mean_logprob_per_token_base: -2.4,
            mean_logprob_per_token_tuned: -0.9,
            improved_fraction: 2.0 / 3.0,
            identical_generation_fraction: 0.0,
            mean_similarity_base: 0.3,
            mean_similarity_tuned: 0.85,
            answer_tokens: 24,
            mean_answer_gain_per_token: gain,
            token_gain_fraction: 0.8,
            median_token_gain: 1.1,
        },
        samples,
        run: serde_json::json!({"data": ["data/train.jsonl"], "note": HOSTILE}),
        timings: Timings { load_s: 1.0, score_s: 2.0, generate_s: 3.0, total_s: 6.0 },
        gpu_memory: None,
    }
}

fn loss_at(step: u64) -> f64 {
    2.2 * (-(step as f64) / 120.0).exp() + 0.3
}

fn compare_report() -> CompareReport {
    let runs = [(100, Verdict::NoEffect, 0.001, 0.31), (200, Verdict::Fail, 0.2, 0.5), (300, Verdict::Pass, 1.4, 0.9)];
    let reports: Vec<Report> = runs
        .iter()
        .map(|&(step, v, gain, _)| report(&format!("out/checkpoint-{step}"), v, &format!("cause of step {step}"), gain))
        .collect();
    let checkpoints = runs
        .iter()
        .zip(&reports)
        .map(|(&(step, verdict, gain, sim), r)| {
            let mut summary = r.summary.clone();
            summary.mean_answer_gain_per_token = gain;
            summary.mean_similarity_tuned = sim;
            CheckpointResult {
                path: r.adapter.path.clone(),
                step: Some(step),
                verdict,
                cause: r.cause.clone(),
                summary,
                train_loss: Some(loss_at(step)),
            }
        })
        .collect();
    CompareReport {
        schema_version: 1,
        checkpoints,
        best: Some(Best {
            path: "out/checkpoint-300".into(),
            step: Some(300),
            why: "highest answer-token gain".into(),
        }),
        loss_curve: (1..=30).map(|i| (i * 10, loss_at(i * 10))).collect(),
        model_loads: 1,
        reports,
    }
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

/// Self-contained and inert: nothing that fetches or runs, whatever the data.
fn check_structure(html: &str) {
    assert!(html.starts_with("<!DOCTYPE html>"), "not an HTML document");
    assert!(html.contains("<meta charset=\"utf-8\">"));
    for bad in ["<script", "<link", "<img", "<iframe", "<object", "<embed", "@import", "url("] {
        assert!(!html.to_ascii_lowercase().contains(bad), "report contains {bad:?}");
    }
    // The only URL is the SVG namespace, which is a name, not a fetch.
    assert_eq!(count(html, "://"), count(html, "xmlns=\"http://www.w3.org/2000/svg\""), "report references a URL");
    assert!(count(html, "<svg") >= 1, "no plot");
    assert_eq!(count(html, "<svg"), count(html, "</svg>"), "unbalanced <svg>");
    assert!(!html.contains(HOSTILE), "a user string went out unescaped");
}

fn check_report(dom: &str, samples: usize) {
    assert!(dom.contains(">pass</span>"), "verdict badge missing");
    assert!(dom.contains("the fine-tune moved the answers"), "cause missing");
    assert!(dom.contains("data.truncated"), "finding code missing");
    assert!(dom.contains("log-prob gain per target token"), "histogram axis missing");
    assert_eq!(count(dom, "<tr class=\"sample"), samples, "sample rows");
    assert!(dom.contains(CHINESE), "Chinese target missing or mangled");
    assert!(dom.contains("<ins>") && dom.contains("<del>"), "no diff highlighting");
    assert!(dom.contains(HOSTILE_ESCAPED), "hostile generation not shown as text");
}

fn check_compare(dom: &str) {
    assert!(dom.contains("best: out/checkpoint-300 (step 300)"), "best checkpoint missing");
    for v in [">pass</span>", ">no_effect</span>", ">fail</span>"] {
        assert!(dom.contains(v), "verdict {v} missing");
    }
    assert_eq!(count(dom, "<tr class=\"checkpoint"), 3, "checkpoint rows");
    assert_eq!(count(dom, "<tr class=\"checkpoint best\""), 1, "best row");
    assert!(count(dom, "<svg") >= 2 + 3, "gain/similarity and loss plots plus one histogram per checkpoint");
    assert!(dom.contains("training loss") && dom.contains("generation similarity"), "plot axes missing");
    assert_eq!(count(dom, "<details open"), 1, "the best checkpoint's report is open");
}

fn chromium() -> Option<PathBuf> {
    let p = std::env::var_os("CHROMIUM").map(PathBuf::from).unwrap_or_else(|| "/usr/bin/chromium".into());
    p.exists().then_some(p)
}

/// Runs headless Chromium on `page` with `mode` (`--dump-dom`, `--screenshot=...`); returns (stdout, stderr).
fn run_chromium(bin: &Path, work: &Path, page: &Path, mode: &str) -> (String, String) {
    let profile = tempfile::tempdir_in(work).unwrap();
    let (out, err) = (work.join("chromium.out"), work.join("chromium.err"));
    let mut child = Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--enable-logging=stderr",
            "--v=0",
            "--window-size=1200,2000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(mode)
        .arg(format!("file://{}", page.display()))
        .stdin(Stdio::null())
        .stdout(File::create(&out).unwrap())
        .stderr(File::create(&err).unwrap())
        .spawn()
        .unwrap();
    // A hung browser must fail the test, not hang CI.
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("chromium did not finish within 120 s on {}", page.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (stdout, stderr) = (std::fs::read_to_string(out).unwrap(), std::fs::read_to_string(err).unwrap());
    assert!(status.success(), "chromium failed ({status}) on {}:\n{stderr}", page.display());
    (stdout, stderr)
}

/// Console messages Chromium logged (`...:INFO:CONSOLE:1] "message", source: ...`) and uncaught errors.
fn console_lines(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|l| l.contains(":CONSOLE") || l.contains("Uncaught")).collect()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn html_report_renders_in_headless_chromium() {
    let r =
        report("adapters/<good> & \"new\"", Verdict::Pass, "the fine-tune moved the answers: +1.25 nats/token", 1.25);
    let single = html::render(&r).unwrap();
    let compare = html::render_compare(&compare_report()).unwrap();
    check_structure(&single);
    check_structure(&compare);
    check_report(&single, r.samples.len());
    check_compare(&compare);

    let Some(bin) = chromium() else {
        let msg = "chromium not found (/usr/bin/chromium or $CHROMIUM): checked the HTML structurally only";
        assert!(std::env::var_os("GLM4_VERIFY_REQUIRE_BROWSER").is_none(), "{msg}");
        eprintln!("NOTICE: {msg}; install it with `apt-get install -y chromium`");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().canonicalize().unwrap();

    // The harness must see console output, or "no console errors" below would pass vacuously.
    let probe = write(&work, "probe.html", "<!DOCTYPE html><p>probe</p><script>console.error('probe-error')</script>");
    let (_, stderr) = run_chromium(&bin, &work, &probe, "--dump-dom");
    assert!(stderr.contains("probe-error"), "chromium's console log is not captured; stderr:\n{stderr}");

    type Check = fn(&str);
    let pages: [(&str, &str, Check); 2] =
        [("report.html", &single, |dom| check_report(dom, 4)), ("compare.html", &compare, check_compare)];
    for (name, page, check) in pages {
        let file = write(&work, name, page);
        let (dom, stderr) = run_chromium(&bin, &work, &file, "--dump-dom");
        assert!(dom.contains("</html>"), "{name}: no DOM dumped; stderr:\n{stderr}");
        check(&dom);
        // What the browser built from the page, not just what we wrote: escaping held.
        assert!(!dom.contains("<script") && !dom.contains("<img"), "{name}: injected markup became elements");
        let console = console_lines(&stderr);
        assert!(console.is_empty(), "{name}: console messages:\n{}", console.join("\n"));

        if let Some(shots) = std::env::var_os("GLM4_VERIFY_SCREENSHOT_DIR") {
            let png = Path::new(&shots).join(name.replace(".html", ".png"));
            run_chromium(&bin, &work, &file, &format!("--screenshot={}", png.display()));
            eprintln!("screenshot: {}", png.display());
        }
    }
}

#[test]
fn html_report_renders_edge_cases() {
    // Nothing to plot in the histogram: no samples, or none with target tokens.
    let mut r = report("a", Verdict::Fail, "no samples", 0.0);
    r.samples.clear();
    let page = html::render(&r).unwrap();
    assert!(page.contains("No sample with target tokens"));
    assert_eq!(count(&page, "<svg"), 0);

    // Explicit adapters (no steps), no training log, nothing passed, one report per adapter on one page.
    let mut c = compare_report();
    c.checkpoints.iter_mut().for_each(|ch| (ch.step, ch.train_loss) = (None, None));
    c.loss_curve.clear();
    c.best = None;
    let page = html::render_compare(&c).unwrap();
    check_structure(&page);
    assert!(page.contains("no checkpoint passes") && page.contains("No training loss logged"));
    assert!(page.contains("checkpoint (in the order given)"));

    let page = html::render_all(&c.reports).unwrap();
    check_structure(&page);
    assert_eq!(count(&page, "<article class=\"report\""), 3);
}
