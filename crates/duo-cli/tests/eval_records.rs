//! `duo eval` records in its folder what the flags left to defaults resolved to: each
//! method's retrieval heads and streaming window (the shipped patterns' trained window,
//! unless `--sink`/`--recent` say otherwise), so that a run can be repeated exactly.

use std::path::PathBuf;
use std::process::Command;

fn eval_command_txt(name: &str, extra: &[&str]) -> String {
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("eval-records-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let run = Command::new(env!("CARGO_BIN_EXE_duo"))
        .args(["eval", "passkey", "--lengths", "500", "--depths", "0.5", "--words", "8", "--out"])
        .arg(&out)
        .args(extra)
        .output()
        .expect("duo runs");
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let text = std::fs::read_to_string(out.join("command.txt")).expect("command.txt");
    let _ = std::fs::remove_dir_all(&out);
    text
}

#[test]
fn eval_records_the_heads_and_window_each_method_ran_with() {
    let text = eval_command_txt("default", &["--methods", "full,duo,streaming"]);
    assert!(text.contains("#   full: 90 retrieval / 0 streaming KV heads\n"), "{text}");
    assert!(text.contains("#   duo: 45 retrieval / 45 streaming KV heads, streaming window 64 + 1024\n"), "the shipped pattern's window: {text}");
    assert!(text.contains("#   streaming: 0 retrieval / 90 streaming KV heads, streaming window 64 + 1024\n"), "{text}");
    let text = eval_command_txt("given", &["--methods", "duo", "--recent", "128", "--sparsity", "0.25"]);
    assert!(text.contains("#   duo: 68 retrieval / 22 streaming KV heads, streaming window 64 + 128\n"), "{text}");
}
