//! `cargo hv profile KEY`: where the instructions of one benchmark operation
//! go.
//!
//! The benchmark guest, given `profile=KEY`, runs benchmark KEY's operation
//! once more between two Bochs magic breakpoints; Bochs's debugger traces
//! every instruction between them (guest, kernel and services alike: the
//! emulated CPU runs them all). Each traced instruction is attributed to its
//! ELF file (the kernel by its high-half address; a service by the bytes at
//! that address in its ELF, since all services are linked at the same base;
//! the guest otherwise) and, through the line tables of a build that keeps
//! them (`BuildOptions::line_tables`), to its function and source line.
//! Counts are of emulated instructions, like every figure of `cargo hv
//! bench`.

use crate::bench::{self, BenchRun};
use anyhow::{Context, Result, bail};
use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One traced instruction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Traced {
    /// The code segment selector (its low two bits: the privilege level).
    pub cs: u16,
    pub addr: u64,
    pub bytes: Vec<u8>,
    /// Bochs's disassembly.
    pub text: String,
}

/// Reads the instructions of a Bochs debugger trace (`trace on`), as
/// `(0).[ticks] [0xphys] SSSS:ADDRESS (context): disassembly ; bytes`.
pub fn parse_trace(text: &str) -> Vec<Traced> {
    text.lines()
        .filter(|l| l.starts_with("(0).["))
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Traced> {
    // Past "(0).[ticks] [0xphys] ".
    let rest = line.splitn(3, "] ").nth(2)?;
    let (cs, rest) = rest.split_once(':')?;
    let (addr, rest) = rest.split_once(' ')?;
    let (_, rest) = rest.split_once("): ")?;
    let (text, bytes) = rest.rsplit_once(';')?;
    let bytes = bytes.trim();
    if bytes.len() % 2 != 0 {
        return None;
    }
    let bytes = (0..bytes.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&bytes[i..i + 2], 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    Some(Traced {
        cs: u16::from_str_radix(cs, 16).ok()?,
        addr: u64::from_str_radix(addr, 16).ok()?,
        bytes,
        text: text.trim().to_owned(),
    })
}

/// An ELF file's code and what its debug information says about it.
struct Binary {
    name: String,
    /// Loadable segments: (address, bytes).
    segments: Vec<(u64, Vec<u8>)>,
    lines: Option<
        addr2line::Context<addr2line::gimli::EndianSlice<'static, addr2line::gimli::RunTimeEndian>>,
    >,
    symbols: Vec<(u64, String)>,
}

/// Where an instruction's code comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Place {
    /// The ELF file (`kernel`, a service's name, `guest`).
    pub binary: String,
    /// The function the instruction's code is in, after inlining.
    pub function: String,
    /// The innermost function of the project's own code it came from (a
    /// library helper inlined there, such as `Option::as_ref`, counts as
    /// its caller).
    pub inner: String,
    /// `file:line` in that function, where known.
    pub line: String,
}

/// A source path relative to the repository, where it is in it.
fn relative(path: &str) -> &str {
    let repo = crate::paths::repo();
    let repo = repo.to_string_lossy();
    path.strip_prefix(repo.as_ref())
        .map_or(path, |p| p.trim_start_matches('/'))
}

/// Whether a source file is the project's (not the Rust library's or a
/// dependency's).
fn own_source(path: &str) -> bool {
    !path.starts_with("/rustc/") && !path.contains("/.cargo/registry/")
}

impl Binary {
    fn load(name: &str, path: &Path) -> Result<Binary> {
        let data: &'static [u8] = Box::leak(
            std::fs::read(path)
                .with_context(|| format!("reading {}", path.display()))?
                .into_boxed_slice(),
        );
        let file = object::File::parse(data)
            .with_context(|| format!("{} is not an ELF file", path.display()))?;
        let segments = file
            .segments()
            .filter_map(|s| Some((s.address(), s.data().ok()?.to_vec())))
            .collect();
        // Code symbols, those of assembly labels (no type) included.
        let mut symbols: Vec<(u64, String)> = file
            .symbols()
            .filter(|s| {
                matches!(
                    s.kind(),
                    object::SymbolKind::Text | object::SymbolKind::Unknown
                ) && s.address() != 0
            })
            .filter_map(|s| Some((s.address(), s.name().ok()?.to_owned())))
            .filter(|(_, n)| !n.is_empty() && !n.starts_with('$') && !n.starts_with(".L"))
            .collect();
        symbols.sort();
        let endian = if file.is_little_endian() {
            addr2line::gimli::RunTimeEndian::Little
        } else {
            addr2line::gimli::RunTimeEndian::Big
        };
        let dwarf = addr2line::gimli::Dwarf::load(|id| -> Result<_, addr2line::gimli::Error> {
            let bytes: &'static [u8] = match file.section_by_name(id.name()) {
                Some(s) => match s.uncompressed_data() {
                    Ok(Cow::Borrowed(b)) => b,
                    Ok(Cow::Owned(v)) => Box::leak(v.into_boxed_slice()),
                    Err(_) => &[],
                },
                None => &[],
            };
            Ok(addr2line::gimli::EndianSlice::new(bytes, endian))
        })?;
        let has_lines = file.section_by_name(".debug_line").is_some();
        let lines = if has_lines {
            Some(addr2line::Context::from_dwarf(dwarf)?)
        } else {
            None
        };
        Ok(Binary {
            name: name.to_owned(),
            segments,
            lines,
            symbols,
        })
    }

    /// Whether this file holds `bytes` at `addr`.
    fn holds(&self, addr: u64, bytes: &[u8]) -> bool {
        self.segments.iter().any(|(base, data)| {
            addr >= *base
                && addr
                    .checked_sub(*base)
                    .and_then(|off| data.get(off as usize..off as usize + bytes.len()))
                    == Some(bytes)
        })
    }

    fn place(&self, addr: u64) -> Place {
        let mut place = Place {
            binary: self.name.clone(),
            function: String::new(),
            inner: String::new(),
            line: String::new(),
        };
        if let Some(ctx) = &self.lines
            && let Ok(mut frames) = ctx.find_frames(addr).skip_all_loads()
        {
            // Innermost first: the first frame in the project's own code
            // names the place; the last one is the function it is in.
            let mut found = false;
            while let Ok(Some(f)) = frames.next() {
                let name = f
                    .function
                    .as_ref()
                    .and_then(|n| n.demangle().ok())
                    .map(|n| short(&n))
                    .unwrap_or_default();
                let file = f.location.as_ref().and_then(|l| l.file).unwrap_or("");
                if !found && own_source(file) && !name.is_empty() {
                    place.inner = name.clone();
                    if let Some(l) = &f.location {
                        place.line = format!("{}:{}", relative(file), l.line.unwrap_or(0));
                    }
                    found = true;
                }
                if !name.is_empty() {
                    place.function = name;
                }
            }
            if !found {
                place.inner = place.function.clone();
            }
        }
        if place.function.is_empty() {
            // No line tables: the symbol the address falls in.
            let i = self.symbols.partition_point(|(a, _)| *a <= addr);
            if i > 0 {
                place.function = short(&addr2line::demangle_auto(
                    Cow::Borrowed(&self.symbols[i - 1].1),
                    None,
                ));
            } else {
                place.function = format!("{addr:#x}");
            }
            place.inner = place.function.clone();
        }
        place
    }
}

/// A demangled name without its hash and generic arguments.
fn short(name: &str) -> String {
    let mut out = String::new();
    let mut depth = 0;
    for c in name.chars() {
        match c {
            '<' => depth += 1,
            '>' => depth -= 1,
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    match out.rsplit_once("::h") {
        Some((head, hash)) if hash.len() == 16 && hash.chars().all(|c| c.is_ascii_hexdigit()) => {
            head.to_owned()
        }
        _ => out,
    }
}

/// The trace of one operation, attributed.
pub struct Profile {
    pub key: String,
    pub cpu_model: String,
    /// The benchmark's own figure from the same run.
    pub figure: Option<u64>,
    pub instructions: Vec<(Traced, Place)>,
}

/// Attributes each traced instruction to a place in `binaries` (name, ELF):
/// `kernel` by address (the upper half), services by their bytes, the rest
/// to `guest`.
fn attribute(trace: Vec<Traced>, binaries: &[Binary]) -> Vec<(Traced, Place)> {
    let kernel = binaries.iter().find(|b| b.name == "kernel");
    let guest = binaries.iter().find(|b| b.name == "guest");
    let services: Vec<&Binary> = binaries
        .iter()
        .filter(|b| b.name != "kernel" && b.name != "guest")
        .collect();
    let mut cache: BTreeMap<(u64, String), Place> = BTreeMap::new();
    let mut last_service: Option<usize> = None;
    let mut out = Vec::with_capacity(trace.len());
    for t in trace {
        let binary = if t.addr >= 0xffff_8000_0000_0000 {
            kernel
        } else if t.cs & 3 == 3 {
            // The service that ran last, if it holds these bytes: the same
            // runtime code lies at the same address in every service.
            let pick = last_service
                .filter(|&i| services[i].holds(t.addr, &t.bytes))
                .or_else(|| services.iter().position(|s| s.holds(t.addr, &t.bytes)));
            last_service = pick.or(last_service);
            pick.map(|i| services[i])
        } else {
            guest
        };
        let place = match binary {
            Some(b) => cache
                .entry((t.addr, b.name.clone()))
                .or_insert_with(|| b.place(t.addr))
                .clone(),
            None => Place {
                binary: if t.cs & 3 == 3 { "ring 3?" } else { "?" }.to_owned(),
                function: format!("{:#x}", t.addr),
                inner: String::new(),
                line: String::new(),
            },
        };
        out.push((t, place));
    }
    out
}

/// The benchmarks whose operation the benchmark guest runs between its
/// magic breakpoints (`Bench::point` in `tests/guests/bench`): the keys
/// `cargo hv profile` takes. The others are counts over many operations,
/// or measured by the host.
pub const KEYS: &[&str] = &[
    "rdtsc_frame_ticks",
    "vmcall_kernel_ticks",
    "vmcall_service_ticks",
    "ipc_roundtrip_ticks",
    "view_create_ticks",
    "lazy_fill_ticks",
    "vmfunc_switch_ticks",
    "view_switch_hypercall_ticks",
    "ve_delivery_ticks",
    "violation_event_ticks",
    "dirty_wp_fault_ticks",
];

/// Refuses a key `cargo hv profile` cannot trace, before anything is built
/// or booted.
pub fn check_key(key: &str) -> Result<()> {
    if !KEYS.contains(&key) {
        bail!(
            "no benchmark {key:?} can be profiled; these can: {}",
            KEYS.join(", ")
        );
    }
    Ok(())
}

/// Boots the benchmark guest with `profile=KEY`, traces KEY's operation and
/// attributes it. `run.build` should keep line tables.
pub fn run(run: &BenchRun, key: &str) -> Result<Profile> {
    check_key(key)?;
    let mut run = run.clone();
    run.guest_options = format!("profile={key}");
    let trace_path: PathBuf = crate::paths::work_dir().join("profile.trace");
    let _ = std::fs::remove_file(&trace_path);
    let (outcome, elfs) = bench::boot(&run, Some(trace_path.clone()))?;
    let figures = bench::figures(&outcome.lines)?;
    if !figures.contains_key(key) {
        bail!(
            "the benchmark guest has no figure {key:?} (it has: {})",
            figures.keys().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    let text = std::fs::read_to_string(&trace_path).with_context(|| {
        format!(
            "Bochs wrote no trace to {} (its debugger stops at magic breakpoints only when built with it)",
            trace_path.display()
        )
    })?;
    let trace = parse_trace(&text);
    if trace.is_empty() {
        bail!(
            "the trace of {key} is empty: the guest never reached its profile point (a feature this CPU model lacks?)"
        );
    }
    let mut binaries = Vec::new();
    for (name, path) in &elfs.files {
        binaries.push(Binary::load(name, path)?);
    }
    binaries.push(Binary::load(
        "guest",
        &run.build.bins().join("guest-bench"),
    )?);
    Ok(Profile {
        key: key.to_owned(),
        cpu_model: run.cpu_model.clone(),
        figure: figures.get(key).copied().flatten(),
        instructions: attribute(trace, &binaries),
    })
}

impl Profile {
    /// Consecutive runs of instructions in one ELF file: (file, count).
    pub fn segments(&self) -> Vec<(String, usize)> {
        let mut out: Vec<(String, usize)> = Vec::new();
        for (_, p) in &self.instructions {
            match out.last_mut() {
                Some((b, n)) if *b == p.binary => *n += 1,
                _ => out.push((p.binary.clone(), 1)),
            }
        }
        out
    }

    /// Instructions per `key` of their place, most first.
    pub fn by(&self, key: impl Fn(&Place) -> String) -> Vec<(String, usize)> {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for (_, p) in &self.instructions {
            *counts.entry(key(p)).or_default() += 1;
        }
        let mut v: Vec<(String, usize)> = counts.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v
    }

    /// The report `cargo hv profile` prints; `top` rows per table, and every
    /// instruction with its place when `listing`.
    pub fn report(&self, top: usize, listing: bool) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "profile of {} on {} (Bochs; emulated instructions): {} traced{}",
            self.key,
            self.cpu_model,
            self.instructions.len(),
            self.figure
                .map_or(String::new(), |f| format!("; the benchmark's median: {f}"))
        );
        let _ = writeln!(s, "\nin order:");
        for (b, n) in self.segments() {
            let _ = writeln!(s, "  {n:>6}  {b}");
        }
        let table = |s: &mut String, title: &str, rows: Vec<(String, usize)>| {
            let _ = writeln!(s, "\n{title}:");
            for (k, n) in rows.into_iter().take(top) {
                let _ = writeln!(s, "  {n:>6}  {k}");
            }
        };
        table(
            &mut s,
            "by function (the project's own; library helpers count in their caller)",
            self.by(|p| format!("{:<8} {}", p.binary, p.inner)),
        );
        table(
            &mut s,
            "by source line",
            self.by(|p| format!("{:<8} {:<36} {}", p.binary, p.line, p.inner)),
        );
        if listing {
            let _ = writeln!(s, "\nevery instruction:");
            for (t, p) in &self.instructions {
                let _ = writeln!(
                    s,
                    "  {:<8} {:>#18x}  {:<40} {} {}",
                    p.binary, t.addr, t.text, p.inner, p.line
                );
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `KEYS` is the benchmark guest's: each key it names has a profile
    /// point there, and each point's key is in `KEYS`.
    #[test]
    fn the_profiled_keys_are_the_guests_points() {
        let source = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/guests/bench/src/main.rs"),
        )
        .expect("the benchmark guest's source");
        let mut points: Vec<&str> = ["b.measure(\"", "b.point(\"", "restricted_writes(&b, \""]
            .iter()
            .flat_map(|call| source.split(call).skip(1))
            .filter_map(|rest| rest.split('"').next())
            .collect();
        points.sort_unstable();
        let mut keys = KEYS.to_vec();
        keys.sort_unstable();
        assert_eq!(points, keys);
    }

    #[test]
    fn a_key_that_cannot_be_profiled_is_refused_with_those_that_can() {
        let e = check_key("first_touch_exits").unwrap_err().to_string();
        assert!(e.contains("\"first_touch_exits\" can be profiled"), "{e}");
        assert!(e.contains("ipc_roundtrip_ticks, view_create_ticks"), "{e}");
        assert!(check_key("vmcall_service_ticks").is_ok());
    }

    #[test]
    fn a_bochs_trace_line_parses() {
        let t = parse_trace(
            "(0) Magic breakpoint\n(0).[457666206] [0x00000057fc15] 0008:0000000000101c15 (unk. ctxt): mov eax, 0x00000003       ; b803000000\n\
             (0).[457666210] [0x00000020a01d] 0008:ffffffff8020a01d (unk. ctxt): push rdi                  ; 57\n\
             (0).[1] [0x0] 002b:0000000000401a57 (unk. ctxt): cmp dword ptr ss:[rsp+752], 0x00000001 ; 83bc24f002000001\n\
             trace off\n",
        );
        assert_eq!(t.len(), 3);
        assert_eq!(
            t[0],
            Traced {
                cs: 8,
                addr: 0x101c15,
                bytes: vec![0xb8, 3, 0, 0, 0],
                text: "mov eax, 0x00000003".to_owned(),
            }
        );
        assert_eq!(t[1].addr, 0xffff_ffff_8020_a01d);
        assert_eq!(t[2].cs, 0x2b);
        assert_eq!(t[2].text, "cmp dword ptr ss:[rsp+752], 0x00000001");
    }

    #[test]
    fn names_lose_their_hash_and_generics() {
        assert_eq!(
            short("kernel::sys::ipc::<impl kernel::sys::Kernel>::deliver::h0123456789abcdef"),
            "kernel::sys::ipc::::deliver"
        );
        assert_eq!(short("memcpy"), "memcpy");
    }

    #[test]
    fn services_are_told_apart_by_their_bytes() {
        let a = Binary {
            name: "a".into(),
            segments: vec![(0x1000, vec![1, 2, 3, 4])],
            lines: None,
            symbols: vec![(0x1000, "f".into())],
        };
        let b = Binary {
            name: "b".into(),
            segments: vec![(0x1000, vec![9, 9, 3, 4])],
            lines: None,
            symbols: vec![(0x1000, "g".into())],
        };
        let t = |addr, bytes: &[u8]| Traced {
            cs: 0x2b,
            addr,
            bytes: bytes.to_vec(),
            text: String::new(),
        };
        let got = attribute(
            vec![t(0x1000, &[9, 9]), t(0x1002, &[3, 4]), t(0x1000, &[1, 2])],
            &[a, b],
        );
        let names: Vec<&str> = got.iter().map(|(_, p)| p.binary.as_str()).collect();
        // The shared bytes at 0x1002 stay with the service that ran last.
        assert_eq!(names, ["b", "b", "a"]);
        assert_eq!(got[0].1.function, "g");
    }
}
