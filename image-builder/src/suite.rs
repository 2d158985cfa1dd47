//! `cargo hv test`'s runner. Cargo runs test binaries one after another, and
//! a boot test file whose last test boots alone keeps one core idle for its
//! whole length (the Bochs fuzz run: 8 minutes). Here every test binary of
//! the host crates (unit tests, the CLI tests, each boot test file) is a job,
//! and as many jobs run at once as the machine has cores, longest first (by
//! the times of the last run in `target/hv/test-times`, or by
//! [`DEFAULT_SECONDS`] on a fresh clone). A boot test file runs its tests
//! one at a time (each boot is one busy emulator thread), so the machine
//! runs as many emulators as it has cores. Each job's output is printed
//! whole when it ends, and kept in `target/hv/test-logs/NAME.log`.

use anyhow::{Context, Result, bail};
use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, mpsc};
use std::time::Instant;

/// The package of the boot tests: its files run one test at a time.
pub const BOOT_TESTS: &str = "parallax-tests";

/// One test binary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    /// `package target` (`parallax-tests vmx`, `platform lib`).
    pub name: String,
    pub exe: PathBuf,
    /// Its package's folder (cargo runs tests there).
    pub dir: PathBuf,
    /// A boot test file.
    pub boot: bool,
}

/// The test executables in cargo's `--message-format=json` output.
pub fn executables(json: &str) -> Result<Vec<Job>> {
    let mut jobs = Vec::new();
    for line in json.lines().filter(|l| l.starts_with('{')) {
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("cargo's JSON line {line:?}"))?;
        if v["reason"] != "compiler-artifact" || v["profile"]["test"] != true {
            continue;
        }
        let Some(exe) = v["executable"].as_str() else {
            continue;
        };
        let manifest = v["manifest_path"]
            .as_str()
            .context("a test artifact without manifest_path")?;
        let dir = Path::new(manifest)
            .parent()
            .context("a manifest path without a folder")?
            .to_owned();
        // `path+file:///work/main/tests#parallax-tests@0.1.0`, or
        // `path+file:///work/main/platform#0.1.0` where the folder is the name.
        let id = v["package_id"].as_str().unwrap_or_default();
        let package = id
            .rsplit_once('#')
            .map(|(_, p)| p.split('@').next().unwrap_or(p))
            .filter(|p| !p.is_empty() && !p.starts_with(|c: char| c.is_ascii_digit()))
            .map(str::to_owned)
            .unwrap_or_else(|| {
                dir.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            });
        let kinds = &v["target"]["kind"];
        let target = if kinds
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "lib"))
        {
            "lib".to_owned()
        } else {
            v["target"]["name"].as_str().unwrap_or("?").to_owned()
        };
        jobs.push(Job {
            name: format!("{package} {target}"),
            exe: PathBuf::from(exe),
            dir,
            boot: package == BOOT_TESTS,
        });
    }
    Ok(jobs)
}

/// Seconds each boot test file took with its tests one at a time, beside
/// another job, on 2 cores (the order on a fresh clone; later runs use their
/// own times).
pub const DEFAULT_SECONDS: &[(&str, u64)] = &[
    ("parallax-tests fuzz", 560),
    ("parallax-tests services", 400),
    ("parallax-tests sharing", 340),
    ("parallax-tests vmx", 260),
    ("parallax-tests altp2m", 70),
    ("image-builder cli", 60),
    ("parallax-tests foreign", 50),
    ("parallax-tests linux", 50),
    ("parallax-tests hostile", 45),
    ("parallax-tests vmi", 40),
    ("parallax-tests iommu", 40),
    ("parallax-tests introspect", 30),
    ("parallax-tests bad_input", 30),
    ("parallax-tests boot", 25),
    ("parallax-tests logdirty", 25),
];

/// The times file's contents: `seconds name` per line.
pub fn parse_times(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let (secs, name) = l.split_once(' ')?;
            Some((name.to_owned(), secs.parse().ok()?))
        })
        .collect()
}

/// Jobs in the order they start: longest first (a known time, else the
/// default, else 30 s for a boot test file and 1 s for host tests), by name
/// among equals.
pub fn order(mut jobs: Vec<Job>, times: &BTreeMap<String, u64>) -> Vec<Job> {
    let estimate = |j: &Job| {
        times
            .get(&j.name)
            .copied()
            .or_else(|| {
                DEFAULT_SECONDS
                    .iter()
                    .find(|(n, _)| *n == j.name)
                    .map(|(_, s)| *s)
            })
            .unwrap_or(if j.boot { 30 } else { 1 })
    };
    jobs.sort_by(|a, b| {
        estimate(b)
            .cmp(&estimate(a))
            .then_with(|| a.name.cmp(&b.name))
    });
    jobs
}

/// What one job did.
#[derive(Debug)]
pub struct Outcome {
    pub job: Job,
    pub ok: bool,
    pub passed: u64,
    pub failed: u64,
    pub seconds: u64,
}

/// Passed and failed tests from libtest's `test result:` lines.
pub fn counts(output: &str) -> (u64, u64) {
    let mut total = (0, 0);
    for line in output.lines().filter(|l| l.starts_with("test result:")) {
        let number = |word: &str| {
            line.split(';')
                .find(|p| p.trim_end().ends_with(word))
                .and_then(|p| p.split_whitespace().rev().nth(1)?.parse::<u64>().ok())
                .unwrap_or(0)
        };
        total.0 += number(" passed");
        total.1 += number(" failed");
    }
    total
}

/// Runs `jobs` on `workers` threads in their order, printing each job's
/// output whole as it ends; `extra` are arguments for every binary (a test
/// name filter). Writes the times file and the logs under `logs`.
pub fn run(jobs: Vec<Job>, workers: usize, extra: &[String], logs: &Path) -> Vec<Outcome> {
    let _ = std::fs::create_dir_all(logs);
    let total = jobs.len();
    let queue = Arc::new(Mutex::new(jobs.into_iter().collect::<VecDeque<_>>()));
    let (tx, rx) = mpsc::channel();
    let mut threads = Vec::new();
    for _ in 0..workers.max(1) {
        let queue = Arc::clone(&queue);
        let tx = tx.clone();
        let extra = extra.to_vec();
        threads.push(std::thread::spawn(move || {
            loop {
                let Some(job) = queue.lock().unwrap().pop_front() else {
                    break;
                };
                let start = Instant::now();
                let mut cmd = Command::new(&job.exe);
                cmd.current_dir(&job.dir)
                    .env("CARGO_MANIFEST_DIR", &job.dir)
                    .args(&extra);
                if job.boot {
                    cmd.arg("--test-threads=1");
                }
                let result = cmd.output();
                let seconds = start.elapsed().as_secs();
                let _ = tx.send((job, result, seconds));
            }
        }));
    }
    drop(tx);
    let mut outcomes = Vec::new();
    for (job, result, seconds) in rx {
        let (ok, text) = match result {
            Ok(out) => {
                let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
                text.push_str(&String::from_utf8_lossy(&out.stderr));
                (out.status.success(), text)
            }
            Err(e) => (false, format!("cannot run {}: {e}\n", job.exe.display())),
        };
        let (passed, failed) = counts(&text);
        println!(
            "\n     Ran {} ({}) in {seconds} s: {}",
            job.name,
            job.exe.display(),
            if ok { "ok" } else { "FAILED" }
        );
        print!("{text}");
        let _ = std::fs::write(
            logs.join(format!("{}.log", job.name.replace(' ', "-"))),
            &text,
        );
        outcomes.push(Outcome {
            job,
            ok,
            passed,
            failed,
            seconds,
        });
        eprintln!("test binaries: {} of {total} done", outcomes.len());
    }
    for t in threads {
        let _ = t.join();
    }
    outcomes
}

/// The times file's text for `outcomes` (kept where a job failed early).
pub fn times_text(outcomes: &[Outcome], old: &BTreeMap<String, u64>) -> String {
    let mut times = old.clone();
    for o in outcomes.iter().filter(|o| o.ok) {
        times.insert(o.job.name.clone(), o.seconds);
    }
    times.iter().map(|(n, s)| format!("{s} {n}\n")).collect()
}

/// Builds the test binaries `cargo_args` (after `cargo test --no-run`) name.
pub fn build(mut cargo: Command, cargo_args: &[&str]) -> Result<Vec<Job>> {
    let out = cargo
        .args([
            "test",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ])
        .args(cargo_args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    if !out.status.success() {
        bail!(
            "the tests do not build (cargo test --no-run {})",
            cargo_args.join(" ")
        );
    }
    executables(&String::from_utf8_lossy(&out.stdout))
}

#[cfg(test)]
mod tests {
    use super::*;

    const JSON: &str = r#"{"reason":"compiler-artifact","package_id":"path+file:///w/tests#parallax-tests@0.1.0","manifest_path":"/w/tests/Cargo.toml","target":{"kind":["test"],"name":"vmx"},"profile":{"test":true},"executable":"/w/target/debug/deps/vmx-1"}
{"reason":"compiler-artifact","package_id":"path+file:///w/platform#0.1.0","manifest_path":"/w/platform/Cargo.toml","target":{"kind":["lib"],"name":"platform"},"profile":{"test":true},"executable":"/w/target/debug/deps/platform-2"}
{"reason":"compiler-artifact","package_id":"path+file:///w/platform#0.1.0","manifest_path":"/w/platform/Cargo.toml","target":{"kind":["lib"],"name":"platform"},"profile":{"test":false},"executable":null}
{"reason":"build-finished","success":true}
"#;

    #[test]
    fn test_executables_are_found_with_their_package_and_folder() {
        let jobs = executables(JSON).unwrap();
        assert_eq!(
            jobs,
            vec![
                Job {
                    name: "parallax-tests vmx".into(),
                    exe: "/w/target/debug/deps/vmx-1".into(),
                    dir: "/w/tests".into(),
                    boot: true,
                },
                Job {
                    name: "platform lib".into(),
                    exe: "/w/target/debug/deps/platform-2".into(),
                    dir: "/w/platform".into(),
                    boot: false,
                },
            ]
        );
        assert!(executables("{not json").is_err());
    }

    #[test]
    fn jobs_start_longest_first_by_last_times_then_defaults() {
        let job = |name: &str, boot| Job {
            name: name.into(),
            exe: PathBuf::new(),
            dir: PathBuf::new(),
            boot,
        };
        let jobs = vec![
            job("platform lib", false),
            job("parallax-tests boot", true),
            job("parallax-tests new", true),
            job("parallax-tests fuzz", true),
        ];
        let names = |v: Vec<Job>| v.into_iter().map(|j| j.name).collect::<Vec<_>>();
        assert_eq!(
            names(order(jobs.clone(), &BTreeMap::new())),
            [
                "parallax-tests fuzz",
                "parallax-tests new",
                "parallax-tests boot",
                "platform lib"
            ]
        );
        let times = parse_times("900 parallax-tests boot\nbad line\n2 platform lib\n");
        assert_eq!(times.len(), 2);
        assert_eq!(
            names(order(jobs, &times)),
            [
                "parallax-tests boot",
                "parallax-tests fuzz",
                "parallax-tests new",
                "platform lib"
            ]
        );
    }

    #[test]
    fn counts_add_every_result_line() {
        let out = "test a ... ok\ntest result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 1.0s\n\
                   test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 2.0s\n";
        assert_eq!(counts(out), (4, 2));
        assert_eq!(counts("no tests here"), (0, 0));
    }
}
