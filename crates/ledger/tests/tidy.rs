//! Enforces the ledger crate's architecture invariant mechanically: no I/O, no
//! clock, no randomness, no threads, no unsafe code in its sources.

use std::path::Path;

const FORBIDDEN: &[(&str, &str)] = &[
    ("std::fs", "file I/O"),
    ("std::io", "I/O"),
    ("std::net", "network I/O"),
    ("std::time", "a clock"),
    ("SystemTime", "a clock"),
    ("Instant::", "a clock"),
    ("std::thread", "threads"),
    ("std::env", "the environment"),
    ("rand::", "randomness"),
    ("RandomState", "randomly seeded hashing"),
    ("std::collections::HashMap", "randomly seeded hashing (use rustc_hash, never iterate into results)"),
    ("std::collections::HashSet", "randomly seeded hashing"),
    ("unsafe", "unsafe code"),
    ("println!", "output"),
];

#[test]
fn ledger_sources_do_no_io_and_read_no_clock() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut checked = 0;
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for (number, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for (needle, what) in FORBIDDEN {
                if *needle == "unsafe" && line.contains("forbid(unsafe_code)") {
                    continue;
                }
                assert!(
                    !code.contains(needle),
                    "{}:{}: {what} in the ledger crate: {line}",
                    path.display(),
                    number + 1
                );
            }
        }
        checked += 1;
    }
    assert!(checked >= 7, "found only {checked} source files in {}", src.display());
}
