//! `duo eval passkey|niah` (grids over lengths × depths × methods, resumable, with
//! heatmaps and a summary) and `duo demo` (one long passkey prompt, three methods).

use crate::args::MethodArgs;
use crate::plot;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use duo_engine::Runner;
use duo_eval::store::Store;
use duo_eval::summary::{grid, markdown, summarise};
use duo_eval::{run_cell, EvalMethod, Grid, Task};

use duo_tasks::Haystack;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};

/// `duo eval ...`.
#[derive(Subcommand, Debug)]
pub enum EvalCommand {
    /// Synthetic passkey retrieval (NATO-word passkeys, ALGORITHM.md §2).
    Passkey(PasskeyArgs),
    /// Needle in a haystack (ALGORITHM.md §6).
    Niah(NiahArgs),
    /// RULER-style tasks: needles with numbers and UUIDs, multi-key, multi-value,
    /// multi-query, variable tracking, common- and frequent-word extraction.
    Ruler(RulerArgs),
    /// Score against KV bytes from finished runs (for example one per sparsity): a PNG with
    /// one line per method, and the table on standard output. Runs nothing.
    Curve(CurveArgs),
}

/// `duo eval curve`.
#[derive(Args, Debug)]
pub struct CurveArgs {
    /// Output folders of finished `duo eval` runs (each holds summary.json).
    #[arg(required = true, num_args = 1..)]
    pub runs: Vec<PathBuf>,
    /// The PNG to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Which score: teacher-forced or generation.
    #[arg(long, default_value = "teacher-forced")]
    pub score: String,
    /// The chart's title.
    #[arg(long, default_value = "score against KV cache")]
    pub title: String,
}

/// `duo eval curve`: each run's summary as points (mean KV MiB per cell, score), one line per
/// method in order of bytes.
fn curve(a: CurveArgs) -> Result<()> {
    let key = match a.score.as_str() {
        "teacher-forced" => "teacher_forced",
        "generation" => "generation",
        other => bail!("--score {other}: teacher-forced or generation"),
    };
    let mut lines: Vec<plot::Series> = Vec::new();
    let mut table = format!("| run | method | mean KV MiB | {} |\n|---|---|---|---|\n", a.score);
    for run in &a.runs {
        let path = run.join("summary.json");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {} (a finished `duo eval` run's folder?)", path.display()))?;
        let rows: Vec<serde_json::Value> = serde_json::from_str(&text).with_context(|| format!("{} is not a summary", path.display()))?;
        for row in rows {
            let (Some(method), Some(score), Some(bytes)) = (row["method"].as_str(), row[key].as_f64(), row["mean_kv_bytes"].as_f64()) else {
                bail!("{}: an entry without method, {key} or mean_kv_bytes", path.display());
            };
            let mib = bytes / (1u64 << 20) as f64;
            table += &format!("| {} | {method} | {mib:.1} | {score:.3} |\n", run.display());
            match lines.iter_mut().find(|s| s.name == method) {
                Some(s) => s.points.push((mib, score)),
                None => lines.push(plot::Series { name: method.to_string(), points: vec![(mib, score)] }),
            }
        }
    }
    for s in &mut lines {
        s.points.sort_by(|p, q| p.0.total_cmp(&q.0));
    }
    plot::line_chart_in(&a.out, &a.title, "mean KV cache per cell (MiB)", &a.score, &lines, Some((0.0, 1.0)))?;
    print!("{table}");
    println!("chart: {}", a.out.display());
    Ok(())
}

/// `duo eval ruler`.
#[derive(Args, Debug)]
pub struct RulerArgs {
    /// Tasks, comma-separated, or `all`: single-number, single-uuid, multi-key, multi-value,
    /// multi-query, variable-tracking, common-words, frequent-words.
    #[arg(long, default_value = "all")]
    pub tasks: String,
    #[command(flatten)]
    pub grid: GridArgs,
}

/// Flags shared by both grids.
#[derive(Args, Debug)]
pub struct GridArgs {
    /// Context lengths in tokens, comma-separated.
    #[arg(long, default_value = "1000,2000,4000,8000")]
    pub lengths: String,
    /// Needle depths in [0, 1], comma-separated.
    #[arg(long, default_value = "0.1,0.3,0.5,0.7,0.9")]
    pub depths: String,
    /// Methods to compare at one KV budget: full,duo,layer,streaming,random.
    #[arg(long, default_value = "full,duo,layer,streaming,random")]
    pub methods: String,
    /// Pattern for the layer method (default: --pattern, binarised by whole layers).
    #[arg(long)]
    pub layer_pattern: Option<PathBuf>,
    /// Answer words given in the prompt before free generation.
    #[arg(long, default_value_t = 4)]
    pub hint_words: usize,
    /// Output folder (results.jsonl, summary, heatmaps, command.txt).
    #[arg(long)]
    pub out: PathBuf,
    /// Write the summary and heatmaps from the results already in OUT, running nothing.
    #[arg(long)]
    pub report_only: bool,
    /// Folder of .txt files for the haystack (passkey default: generated prose).
    #[arg(long)]
    pub haystack: Option<PathBuf>,
    #[command(flatten)]
    pub method: MethodArgs,
}

/// `duo eval passkey`.
#[derive(Args, Debug)]
pub struct PasskeyArgs {
    /// Words per passkey.
    #[arg(long, default_value_t = 32)]
    pub words: usize,
    #[command(flatten)]
    pub grid: GridArgs,
}

/// `duo eval niah`.
#[derive(Args, Debug)]
pub struct NiahArgs {
    /// The sentence hidden in the haystack.
    #[arg(long, default_value = duo_eval::NEEDLE)]
    pub needle: String,
    /// The question asked after the haystack.
    #[arg(long, default_value = duo_eval::QUESTION)]
    pub question: String,
    #[command(flatten)]
    pub grid: GridArgs,
}

fn parse_list<T: std::str::FromStr>(s: &str, what: &str) -> Result<Vec<T>> {
    s.split(',').map(|v| v.trim().parse::<T>().map_err(|_| anyhow::anyhow!("`{v}` in --{what} is not a valid number"))).collect()
}

/// Runs `duo eval`.
pub fn run(cmd: EvalCommand) -> Result<()> {
    let (tasks, g, per_task_folders) = match cmd {
        EvalCommand::Curve(a) => return curve(a),
        EvalCommand::Passkey(a) => (vec![Task::Passkey { words: a.words }], a.grid, false),
        EvalCommand::Niah(a) => (vec![Task::Niah { needle: a.needle, question: a.question }], a.grid, false),
        EvalCommand::Ruler(a) => (duo_tasks::RulerTask::parse_list(&a.tasks)?.into_iter().map(Task::Ruler).collect(), a.grid, true),
    };
    let methods = EvalMethod::parse_list(&g.methods)?;
    // What cannot be evaluated at all (random weights) is refused before anything else.
    g.method.model_source()?;
    let base = g.method.spec()?;
    // An accuracy study may round the CPU cache as a quantised scheme would hold it
    // (`DUO_SIMULATE_KV`, duo_kv::KvSim): a bad value is refused here, as is asking it of the
    // GPU, whose cache is never simulated.
    let simulate = duo_kv::KvSim::from_env().map_err(anyhow::Error::msg)?;
    if let Some(sim) = simulate {
        if matches!(g.method.device, duo_engine::Device::Cuda(_)) {
            bail!("{}: simulated caches are the CPU cache's; the GPU has real ones (--kv-dtype fp8, int8, int4, k8v4)", duo_kv::sim::ENV);
        }
        if [base.kv_dtype, base.kv_dtype_streaming].into_iter().flatten().any(|d| d != duo_engine::KvDtype::F32 && d != duo_engine::KvDtype::F16) {
            bail!("{}: a simulated cache rounds an f32 or f16 cache, not an int8 one (it would round twice)", duo_kv::sim::ENV);
        }
        eprintln!("duo eval: the KV cache is rounded as a quantised cache would hold it ({sim:?}, from {}); its memory is unchanged", duo_kv::sim::ENV);
    }
    let needs_corpus = tasks.iter().any(|t| matches!(t, Task::Niah { .. }));
    let haystack = match &g.haystack {
        Some(dir) => Haystack::from_dir(dir)?,
        None if !needs_corpus => Haystack::Generated,
        None => {
            let standard = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/reference/niah-haystack-paul-graham");
            if standard.is_dir() {
                Haystack::from_dir(&standard)?
            } else {
                bail!("duo eval niah needs --haystack DIR (a folder of .txt files, such as the Paul Graham essays)")
            }
        }
    };
    let lengths = parse_list(&g.lengths, "lengths")?;
    let depths = parse_list(&g.depths, "depths")?;
    let (model, _) = g.method.load()?;
    if let Some(sim) = simulate {
        sim.check_head_dim(model.config().head_dim).map_err(anyhow::Error::msg)?;
    }
    // Resolve every method first: a missing or misshapen pattern fails before any work.
    let mut runners = Vec::new();
    for &m in &methods {
        let spec = m.spec(&base, g.layer_pattern.as_ref());
        let resolved = duo_engine::ResolvedMethod { simulate, ..spec.resolve(model.config()).with_context(|| format!("method {}", m.name()))? };
        runners.push((m, Runner::new(&model, resolved)));
    }
    let mut table = Vec::new();
    for task in tasks {
        let out = if per_task_folders { g.out.join(task.name()) } else { g.out.clone() };
        let grid = Grid { task, haystack: haystack.clone(), lengths: lengths.clone(), depths: depths.clone(), hint_words: g.hint_words, seed: g.method.seed() };
        grid.validate(model.config().context_length)?;
        let results = run_grid(&model, &runners, &methods, &grid, &out, g.report_only)?;
        table.push((grid.task.name(), summarise(&results, &methods)));
    }
    if per_task_folders {
        let text = ruler_table(&table, &methods);
        std::fs::write(g.out.join("summary.md"), &text)?;
        println!("{text}");
    }
    Ok(())
}

/// Task rows x method columns: teacher-forced / generation means over every cell.
fn ruler_table(table: &[(&str, Vec<duo_eval::summary::MethodSummary>)], methods: &[EvalMethod]) -> String {
    let mut text = format!("| task | {} |\n|---|{}\n", methods.iter().map(|m| m.name()).collect::<Vec<_>>().join(" | "), "---|".repeat(methods.len()));
    for (task, summaries) in table {
        let cells: Vec<String> = methods
            .iter()
            .map(|m| summaries.iter().find(|s| s.method == *m).map_or("-".into(), |s| format!("{:.2} / {:.2}", s.teacher_forced, s.generation)))
            .collect();
        text.push_str(&format!("| {task} | {} |\n", cells.join(" | ")));
    }
    text.push_str("\nEach cell: teacher-forced / generation mean over all lengths and depths.\n");
    text
}

/// Runs (or resumes) one grid into `out` and writes its report; returns the grid's results.
fn run_grid(model: &duo_engine::Engine, runners: &[(EvalMethod, Runner)], methods: &[EvalMethod], grid_spec: &Grid, out: &Path, report_only: bool) -> Result<Vec<duo_eval::CellResult>> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let task_name = grid_spec.task.name();
    let mut store = Store::open(&out.join("results.jsonl"))?;
    if report_only {
        write_report(out, task_name, store.results(), methods, grid_spec)?;
        return Ok(store.results().iter().filter(|r| r.task == task_name).cloned().collect());
    }
    let command: Vec<String> = std::env::args().collect();
    let mut log = std::fs::OpenOptions::new().create(true).append(true).open(out.join("command.txt"))?;
    std::io::Write::write_all(&mut log, format!("{}\n", command.join(" ")).as_bytes())?;
    // What the flags left to defaults resolved to (the window comes from the pattern).
    for (m, runner) in runners {
        let (p, w) = (&runner.method.pattern, runner.method.window);
        let window = if p.streaming_count() == 0 { String::new() } else { format!(", streaming window {} + {}", w.sink, w.recent) };
        let line = format!("#   {}: {} retrieval / {} streaming KV heads{window}\n", m.name(), p.retrieval_count(), p.streaming_count());
        std::io::Write::write_all(&mut log, line.as_bytes())?;
    }

    let total = grid_spec.lengths.len() * grid_spec.depths.len() * methods.len();
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("eval {bar:30} {pos}/{len} [{elapsed_precise} < {eta_precise}] {msg}").unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    for &length in &grid_spec.lengths {
        for &depth in &grid_spec.depths {
            let todo: Vec<&(EvalMethod, Runner)> = runners.iter().filter(|(m, _)| !store.has(task_name, *m, length, depth)).collect();
            bar.inc((methods.len() - todo.len()) as u64);
            if todo.is_empty() {
                continue;
            }
            let cell = grid_spec.prompt(&model.tokenizer, length, depth)?;
            for (m, runner) in todo {
                bar.set_message(format!("{task_name} {} len {length} depth {depth}", m.name()));
                let r = run_cell(runner, grid_spec, *m, length, depth, &cell)?;
                let line = format!(
                    "{task_name} {:9} len {:5} depth {:.2}: generation {:.2} teacher-forced {:.2} KV {:.1} MiB | {}",
                    m.name(),
                    length,
                    depth,
                    r.generation,
                    r.teacher_forced,
                    r.kv_bytes as f64 / 1048576.0,
                    r.answer.replace('\n', " ").chars().take(60).collect::<String>()
                );
                // A hidden bar (output not a terminal) drops println: log to stderr then.
                if bar.is_hidden() {
                    eprintln!("{line}");
                } else {
                    bar.println(line);
                }
                store.push(r)?;
                bar.inc(1);
            }
        }
    }
    bar.finish();
    write_report(out, task_name, store.results(), methods, grid_spec)?;
    Ok(store.results().iter().filter(|r| r.task == task_name).cloned().collect())
}

/// Summary (markdown + JSON) and heatmaps of every method.
fn write_report(out: &Path, task: &str, results: &[duo_eval::CellResult], methods: &[EvalMethod], g: &Grid) -> Result<()> {
    let results: Vec<duo_eval::CellResult> = results.iter().filter(|r| r.task == task).cloned().collect();
    let summaries = summarise(&results, methods);
    let table = markdown(&summaries);
    std::fs::write(out.join("summary.md"), &table)?;
    std::fs::write(out.join("summary.json"), serde_json::to_string_pretty(&summaries)?)?;
    let rows: Vec<String> = g.depths.iter().map(|d| format!("{d}")).collect();
    let cols: Vec<String> = g.lengths.iter().map(|l| format!("{l}")).collect();
    for &m in methods {
        for (teacher, kind) in [(true, "teacher"), (false, "generation")] {
            let values = grid(&results, m, &g.lengths, &g.depths, teacher);
            let title = format!("{} {} {} (DEPTH X LENGTH)", task, m.name(), if teacher { "TEACHER-FORCED" } else { "GENERATION" });
            plot::score_grid(&out.join(format!("{task}-{}-{kind}.png", m.name())), &title, &rows, &cols, &values)?;
        }
    }
    println!("{table}");
    println!("wrote {}", out.display());
    Ok(())
}

/// `duo demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 4000)]
    pub length: usize,
    /// Needle depth in [0, 1].
    #[arg(long, default_value_t = 0.3)]
    pub depth: f64,
    /// Answer words given before generation (small models may not find a needle unprompted).
    #[arg(long, default_value_t = 4)]
    pub hint_words: usize,
    /// Words per passkey.
    #[arg(long, default_value_t = 16)]
    pub words: usize,
    #[command(flatten)]
    pub method: MethodArgs,
}

/// Runs `duo demo`: one long passkey prompt with full attention, DuoAttention and the
/// layer layout, printing answer, KV bytes and speed for each.
pub fn demo(a: DemoArgs) -> Result<()> {
    let base = a.method.spec()?;
    if base.pattern.is_none() {
        println!("no head pattern given and none shipped for this model: showing full attention and StreamingLLM only\n");
    }
    let (model, _) = a.method.load()?;
    println!("running on {}\n", model.backend().describe());
    let grid = Grid {
        task: Task::Passkey { words: a.words },
        haystack: Haystack::Generated,
        lengths: vec![a.length],
        depths: vec![a.depth],
        hint_words: a.hint_words,
        seed: a.method.seed(),
    };
    grid.validate(model.config().context_length)?;
    let cell = grid.prompt(&model.tokenizer, a.length, a.depth)?;
    println!(
        "passkey prompt: {} tokens, needle at depth {:.0}%, {} hint words; expected passkey:\n  {}\n",
        cell.prompt.len(),
        a.depth * 100.0,
        a.hint_words,
        cell.words.join(" ")
    );
    let methods: Vec<EvalMethod> =
        if base.pattern.is_some() { vec![EvalMethod::Full, EvalMethod::Duo, EvalMethod::Layer] } else { vec![EvalMethod::Full, EvalMethod::Streaming] };
    println!("| method | retrieval KV heads | answer | words right | teacher-forced | KV MiB | prefill tok/s |");
    println!("|---|---:|---|---:|---:|---:|---:|");
    for m in methods {
        let resolved = m.spec(&base, None).resolve(model.config())?;
        let heads = resolved.pattern.retrieval_count();
        let all = resolved.pattern.n_layers() * resolved.pattern.n_kv_heads();
        let runner = Runner::new(&model, resolved);
        let r = run_cell(&runner, &grid, m, a.length, a.depth, &cell)?;
        println!(
            "| {} | {heads}/{all} | {} | {:.0}% | {:.0}% | {:.1} | {:.0} |",
            m.name(),
            r.answer.split_whitespace().take(a.words).collect::<Vec<_>>().join(" "),
            r.generation * 100.0,
            r.teacher_forced * 100.0,
            r.kv_bytes as f64 / 1048576.0,
            cell.prompt.len() as f64 / r.prefill_seconds
        );
    }
    Ok(())
}
