//! The `glm4-verify` command line: flags in, exit code out. The work is in the library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use glm4_verify::pipeline::{self, Options};
use glm4_verify::report::{self, Format};
use glm4_verify::suite::Suite;

/// Did this GLM-4 LoRA fine-tune learn anything? Scores the adapter against its base on the
/// training data and says why when it did not.
///
/// Exit codes: 0 pass, 1 the adapter failed verification, 2 the run could not be done.
#[derive(Parser)]
#[command(name = "glm4-verify", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    verify: VerifyArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Static checks only (no model run): adapter files against the base, data format, labels, training log.
    Check(VerifyArgs),
    /// Show which tokens of a few rows are trained, and the length table.
    InspectData(InspectArgs),
    /// Build a tiny GLM-4 and real LoRA adapters (good, untrained, truncated labels, wrong keys), then verify them.
    Demo(DemoArgs),
    /// Score every checkpoint-N of a training output directory (or the adapters given) against one base load.
    Compare(CompareArgs),
}

#[derive(Args)]
struct DemoArgs {
    /// Where to write the demo's model, data and adapters (default: a temporary directory).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Keep the temporary directory.
    #[arg(long)]
    keep: bool,
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

#[derive(Args)]
struct CompareArgs {
    /// A training output directory with checkpoint-N/ inside, or two or more adapter directories.
    #[arg(required = true, value_name = "DIR")]
    dirs: Vec<PathBuf>,
    #[command(flatten)]
    verify: VerifyArgs,
}

#[derive(Args, Clone)]
struct VerifyArgs {
    /// PEFT adapter directory, training output directory (its highest checkpoint-N) or merged model directory. Repeatable.
    #[arg(long = "adapter", value_name = "DIR")]
    adapters: Vec<PathBuf>,
    /// Base model directory or Hugging Face id (local cache). Default: base_model_name_or_path of adapter_config.json.
    #[arg(long, value_name = "DIR|HF_ID")]
    base: Option<String>,
    /// finetune_demo jsonl file, or a data directory read through --config's data_config. Repeatable.
    #[arg(long, value_name = "FILE|DIR")]
    data: Vec<PathBuf>,
    /// The finetune_demo lora.yaml the adapter was trained with (combine, max lengths define the targets).
    #[arg(long, value_name = "lora.yaml")]
    config: Option<PathBuf>,
    /// Suite file (data, samples, gates); flags override it. Default: suites/default.yaml (built in).
    #[arg(long, value_name = "FILE")]
    suite: Option<PathBuf>,
    /// Number of rows to draw (with --seed). Default: all rows up to 256.
    #[arg(long, value_name = "N")]
    samples: Option<usize>,
    #[arg(long, value_name = "N")]
    seed: Option<u64>,
    /// Which data_config file a data directory is read through.
    #[arg(long, default_value = "train", value_parser = ["train", "val", "test"])]
    split: String,
    /// auto, cpu, cuda or cuda:N
    #[arg(long, default_value = "auto")]
    device: String,
    /// auto (bf16 on GPUs with compute capability ≥ 8.0, f16 on older ones, f32 on CPU), f32, bf16, f16
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// Greedy tokens per sample. Default: the target's length + 16.
    #[arg(long, value_name = "N")]
    max_new_tokens: Option<usize>,
    /// Rows per forward pass, or auto.
    #[arg(long, value_name = "N|auto", default_value = "auto")]
    batch_size: String,
    /// The most GPU memory the run may take, CUDA context included (as nvidia-smi counts it), e.g.
    /// 22GB or 20GiB: batches shrink to fit (slower). Default: 95% of the card's memory. CUDA only.
    #[arg(long, value_name = "SIZE", value_parser = parse_gpu_memory)]
    gpu_memory: Option<u64>,
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
    /// Write the report here (atomically) instead of stdout.
    #[arg(long, short = 'o', value_name = "FILE")]
    output: Option<PathBuf>,
    /// Stop the whole run after this many seconds (exit 2; the samples finished by then are
    /// reported with the verdict `incomplete`).
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<u64>,
    /// Always generate --max-new-tokens tokens (ignore end tokens): for benchmarks.
    #[arg(long, hide = true)]
    ignore_eos: bool,
    /// A JSON report of an earlier run of the same suite and data: fail on a drop past the suite's tolerance.
    #[arg(long, value_name = "FILE")]
    baseline: Option<PathBuf>,
    /// No progress or notes on stderr.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct InspectArgs {
    #[arg(long, value_name = "FILE")]
    data: PathBuf,
    #[arg(long, value_name = "lora.yaml")]
    config: Option<PathBuf>,
    /// Directory with tokenizer.json or tokenizer.model (and the chat template): usually the base model.
    #[arg(long, value_name = "DIR")]
    tokenizer: PathBuf,
    #[arg(long, default_value_t = 3)]
    rows: usize,
}

fn parse_gpu_memory(s: &str) -> Result<u64, String> {
    glm4_verify::score::budget::parse_size(s)
}

fn options(a: &VerifyArgs) -> anyhow::Result<Options> {
    let suite = match &a.suite {
        Some(p) => Suite::read(p)?,
        None => Suite::builtin(),
    };
    let batch_size = match a.batch_size.as_str() {
        "auto" => None,
        n => Some(
            n.parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| anyhow::anyhow!("--batch-size {n}: expected a positive number or auto"))?,
        ),
    };
    if a.samples == Some(0) {
        anyhow::bail!("--samples 0: expected a positive number of rows");
    }
    Ok(Options {
        adapters: a.adapters.clone(),
        base: a.base.clone(),
        data: a.data.clone(),
        config: a.config.clone(),
        seed: a.seed.or(suite.seed).unwrap_or(0),
        suite,
        samples: a.samples,
        device: a.device.clone(),
        dtype: a.dtype.clone(),
        max_new_tokens: a.max_new_tokens,
        batch_size,
        gpu_memory: a.gpu_memory,
        split: a.split.clone(),
        ignore_eos: a.ignore_eos,
        progress: !a.quiet && std::io::stderr().is_terminal(),
    })
}

fn emit(text: &str, output: Option<&PathBuf>) -> anyhow::Result<()> {
    match output {
        Some(p) => report::write_atomic(p, text),
        None => {
            print!("{text}");
            Ok(())
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let timeout = match &cli.command {
        None => cli.verify.timeout,
        Some(Command::Check(a)) => a.timeout,
        Some(Command::Compare(c)) => c.verify.timeout,
        _ => None,
    };
    if let Some(t) = timeout {
        glm4_verify::stop::set_timeout(std::time::Duration::from_secs(t));
    }
    // First Ctrl-C: stop at the next batch (a partial report marked incomplete); second: leave at once.
    let _ = ctrlc::set_handler(|| {
        if glm4_verify::stop::interrupted() {
            std::process::exit(130);
        }
        glm4_verify::stop::interrupt();
        eprintln!("\ninterrupt: stopping after the current batch (Ctrl-C again to quit now)");
    });
    match cli.command {
        None => {
            let a = cli.verify;
            let opts = options(&a)?;
            let mut reports = pipeline::verify(&opts)?;
            glm4_verify::model::profile::mark("verify returned");
            let incomplete = reports.iter().any(|r| r.verdict == report::Verdict::Incomplete);
            if let (Some(b), false) = (&a.baseline, incomplete) {
                if reports.len() != 1 {
                    anyhow::bail!("--baseline compares one adapter's report; {} adapters were given", reports.len());
                }
                let base = glm4_verify::baseline::load(b, &reports[0])?;
                glm4_verify::baseline::apply(&mut reports[0], &base, &opts.suite.regression);
            }
            if !a.quiet {
                for r in &reports {
                    if let Some(n) = &r.adapter.note {
                        eprintln!("note: {n}");
                    }
                }
            }
            let color = a.output.is_none() && std::io::stdout().is_terminal();
            emit(&report::render(&reports, a.format, color)?, a.output.as_ref())?;
            glm4_verify::model::profile::mark("report written");
            if incomplete {
                // The partial report is written; the run itself could not be done.
                eprintln!(
                    "error: the run stopped early; the report covers the finished samples only (verdict: incomplete)"
                );
                return Ok(ExitCode::from(2));
            }
            Ok(if reports.iter().all(|r| r.passed()) { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        Some(Command::Check(a)) => {
            let opts = options(&a)?;
            let findings = glm4_verify::preflight::check(&opts)?;
            let text = glm4_verify::preflight::render(&findings, a.format)?;
            emit(&text, a.output.as_ref())?;
            let errors = findings.iter().any(|f| f.severity == glm4_verify::finding::Severity::Error);
            Ok(if errors { ExitCode::from(1) } else { ExitCode::SUCCESS })
        }
        Some(Command::Compare(c)) => {
            let opts = options(&c.verify)?;
            let rep = glm4_verify::compare::compare(&c.dirs, &opts)?;
            let text = match c.verify.format {
                Format::Json => serde_json::to_string_pretty(&rep)? + "\n",
                Format::Markdown => glm4_verify::compare::render_text(&rep, true),
                Format::Junit => report::render(&rep.reports, Format::Junit, false)?,
                Format::Html => glm4_verify::report::html::render_compare(&rep)?,
                Format::Text => glm4_verify::compare::render_text(&rep, false),
            };
            emit(&text, c.verify.output.as_ref())?;
            Ok(if rep.any_passed() { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        Some(Command::Demo(d)) => demo(d),
        Some(Command::InspectData(a)) => {
            let color = std::io::stdout().is_terminal();
            let text = glm4_verify::preflight::inspect_data(&a.data, a.config.as_deref(), &a.tokenizer, a.rows, color)?;
            print!("{text}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Builds the demo's artefacts, verifies each adapter, and checks every verdict is the expected one.
fn demo(d: DemoArgs) -> anyhow::Result<ExitCode> {
    let (dir, temporary) = match &d.dir {
        Some(p) => (p.clone(), false),
        None => (std::env::temp_dir().join(format!("glm4-verify-demo-{}", std::process::id())), true),
    };
    let t0 = std::time::Instant::now();
    eprintln!(
        "building the demo in {} (tiny GLM-4, tokenizer, data, LoRA adapters trained with candle)",
        dir.display()
    );
    let files = glm4_verify::demo::build(&dir, d.seed)?;
    for line in &files.log {
        eprintln!("  {line}");
    }
    let color = std::io::stdout().is_terminal();
    let mut table = Vec::new();
    for (name, path, expected) in &files.adapters {
        // The truncated adapter is verified with the config it was trained with, as a user would.
        let config = if name == "truncated" { &files.truncated_config } else { &files.config };
        let opts = Options {
            adapters: vec![path.clone()],
            base: Some(files.base.display().to_string()),
            data: vec![files.data.clone()],
            config: Some(config.clone()),
            device: "cpu".into(),
            ..Options::default()
        };
        let r = pipeline::verify(&opts)?.remove(0);
        println!("── {name} ──");
        print!("{}", report::render(std::slice::from_ref(&r), Format::Text, color)?);
        println!();
        let ok = if expected == "pass" { r.passed() } else { !r.passed() };
        table.push((name.clone(), expected.clone(), r.verdict.as_str().to_string(), r.cause.clone(), ok));
    }
    println!("demo summary ({:.1}s):", t0.elapsed().as_secs_f64());
    for (name, expected, got, cause, ok) in &table {
        println!(
            "  {:<11} expected {:<10} got {:<10} {}  {cause}",
            name,
            expected,
            got,
            if *ok { "ok" } else { "UNEXPECTED" }
        );
    }
    if temporary && !d.keep {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        println!("files kept in {}", dir.display());
    }
    Ok(if table.iter().all(|t| t.4) { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn main() -> ExitCode {
    glm4_verify::model::profile::mark("start");
    if std::env::args().nth(1).as_deref() == Some("demo") {
        // Tiny tensors: candle's thread pools cost more than they give (see demo::prefer_single_thread).
        glm4_verify::demo::prefer_single_thread();
    }
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let result = run(cli);
    glm4_verify::model::profile::mark("end of main");
    if let Some(p) = glm4_verify::model::profile::report() {
        eprint!("{p}");
    }
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
