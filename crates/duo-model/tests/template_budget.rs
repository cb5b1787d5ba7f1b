//! Chat templates run under a memory and time budget: a template that doubles a string
//! 64 times (which grew a process to 19 GB before) fails with an error naming the template,
//! and the process stays small.

use duo_model::{ChatTemplate, Message};

// As in the `duo` binary: allocations are charged to budgeted threads.
#[global_allocator]
static ALLOCATOR: duo_model::budget::BudgetAllocator = duo_model::budget::BudgetAllocator;

fn peak_rss_mib() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok()).map_or(0.0, |kib| kib / 1024.0)
}

#[test]
fn a_template_that_doubles_a_string_is_stopped_within_its_budget() {
    let bombs = [
        "{% set s = namespace(v='a') %}{% for i in range(64) %}{% set s.v = s.v ~ s.v %}{% endfor %}{{ s.v }}",
        "{% macro f(s, n) %}{% if n > 0 %}{{ f(s ~ s ~ s ~ s ~ s ~ s ~ s ~ s, n - 1) }}{% else %}{{ s }}{% endif %}{% endmacro %}{{ f('abcdefgh', 12) }}",
    ];
    for src in bombs {
        let t = ChatTemplate::new(src, "", "").expect("compiles");
        let m = vec![Message { role: "user".into(), content: "hi".into() }];
        let e = t.render(&m, true).expect_err("stopped").to_string();
        assert!(e.contains("template") && (e.contains("memory") || e.contains("longer")), "{e}");
        let again = t.render(&m, true).expect_err("not run again").to_string();
        assert!(again.contains("not run again"), "{again}");
    }
    let peak = peak_rss_mib();
    assert!(peak < 1024.0, "peak resident memory {peak:.0} MiB");
    // A real template still renders, before and after.
    let chatml = ChatTemplate::new("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}", "", "").expect("chatml");
    let text = chatml.render(&[Message { role: "user".into(), content: "x".repeat(100_000) }], false).expect("renders");
    assert!(text.len() > 100_000);
}
