//! Debian 12's packaged Linux as a Parallax guest: the package downloaded
//! with `apt-get download`, its vmlinux taken out of the bzImage (the xz
//! stream found in it and unpacked with `xz`, as the kernel tree's
//! `extract-vmlinux` does), trimmed to its loadable bytes, and a small
//! initramfs around `tests/kernels/linux-init.c` (docs/guests.md, How to
//! boot Linux). Everything is made under `target/hv/linux/`, never committed.
//!
//! Used by the boot test (`tests/linux.rs`), `cargo hv bench` (the
//! `linux_boot_ticks` and `idle_exits_per_second` figures) and `cargo hv
//! linux` (which writes a manifest such as `examples/linux.toml` uses).

use anyhow::{Context, Result, bail, ensure};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The package `linux-image-amd64` depends on (Debian 12's current kernel).
pub const META_PACKAGE: &str = "linux-image-amd64";

/// The kernel command line Linux boots with under Parallax today, and why
/// each option is there:
/// - `console=ttyS0`: the boot log on COM1, the vmm's 16550.
/// - `earlyprintk=serial`: the same from the first instruction on.
/// - (no `noapic`): Linux finds the I/O APIC and the override of IRQ 0
///   (GSI 2) in the MADT and routes the ISA lines through it (its timer
///   check takes the PIT's IRQ 0 on pin 2); its local APIC it uses through
///   the xAPIC page, with the TSC-deadline timer as its clock event device
///   (one WRMSR to arm it, and an idle Linux wakes only when a timer is
///   due).
/// - `io_delay=none`: no write to port 0x80 after each PIC and PIT access
///   (an exit each, for a delay no emulated device needs).
/// - `tsc=reliable`: no clocksource watchdog on the TSC. The watchdog
///   compares it with jiffies, and jiffies lag: a PIT edge that comes while
///   the last one still waits (interrupts off for longer than a tick, as
///   when the console is written byte by byte, an exit each) is lost
///   (docs/guests.md, Interrupts), so Linux would call the TSC unstable and
///   keep time by jiffies. The TSC's rate is exact (CPUID leaf 0x15).
/// - `cryptomgr.notests`: no self-test of every crypto algorithm at the
///   end of the boot (`crypto_algapi_init`): 7.7 s of the 18.3 s to /init
///   on Bochs (`initcall_debug`), the generic code paths running
///   instruction by instruction. Not needed to boot; a speed option.
pub const CMDLINE: &str =
    "console=ttyS0 earlyprintk=serial io_delay=none tsc=reliable cryptomgr.notests";

/// The guest RAM the example and the tests give Linux (the kernel is
/// loaded at 16 MiB and needs about 60 MiB with its bss; the rest is for
/// its allocations).
pub const MEMORY_MIB: u32 = 256;

/// The first line /init prints (then `, tsc N`).
pub const INIT_LINE: &str = "parallax-init: /init runs";

/// What the guest needs, in `target/hv/linux/`.
#[derive(Clone, Debug)]
pub struct Files {
    /// The trimmed vmlinux (a PVH ELF).
    pub vmlinux: PathBuf,
    /// The cpio (newc) initramfs with /init and /dev/console.
    pub initramfs: PathBuf,
    /// The package's version (`6.1.0-57-amd64`).
    pub version: String,
}

/// Where it all goes.
pub fn dir() -> PathBuf {
    crate::paths::target_dir().join("linux")
}

/// Downloads the package (once; kept under `target/hv/linux/`), extracts and
/// trims its vmlinux, builds the initramfs. An error says which step
/// failed; the download's error says so (`download failed`), for callers
/// that skip without a network.
pub fn prepare() -> Result<Files> {
    let dir = dir();
    std::fs::create_dir_all(&dir)?;
    let deb = download(&dir)?;
    let version = deb
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("linux-image-"))
        .and_then(|n| n.split('_').next())
        .context("the package's file name")?
        .to_owned();
    let versioned = dir.join(format!("vmlinux-{version}.pvh"));
    if !versioned.exists() {
        let bzimage = extract_bzimage(&deb, &dir, &version)?;
        let elf = unpack_vmlinux(&std::fs::read(&bzimage)?)?;
        let trimmed = trim_elf(&elf)?;
        let tmp = versioned.with_extension("tmp");
        std::fs::write(&tmp, trimmed)?;
        std::fs::rename(&tmp, &versioned)?;
    }
    // Under a name that does not change with the version (what
    // examples/linux.toml names).
    let vmlinux = dir.join("vmlinux.pvh");
    let _ = std::fs::remove_file(&vmlinux);
    std::fs::copy(&versioned, &vmlinux)?;
    let initramfs = dir.join("initramfs.cpio");
    let init = build_init(&dir)?;
    std::fs::write(
        &initramfs,
        cpio(&[
            Entry::dir("dev"),
            Entry::char_device("dev/console", 5, 1),
            Entry::file("init", 0o755, std::fs::read(init)?),
        ]),
    )?;
    Ok(Files {
        vmlinux,
        initramfs,
        version,
    })
}

/// A manifest that boots `files` in one domain named `linux` with
/// `cmdline`, for `cargo hv build --manifest` (paths absolute).
pub fn manifest(files: &Files, name: &str, cmdline: &str) -> String {
    format!(
        "name = \"{name}\"\n\n[[domain]]\nname = \"linux\"\nkernel = \"{}\"\nmemory_mib = {MEMORY_MIB}\ncmdline = \"{cmdline}\"\nmodules = [{{ path = \"{}\" }}]\n",
        files.vmlinux.display(),
        files.initramfs.display()
    )
}

/// The package file, downloaded into `dir` unless a version is there.
fn download(dir: &Path) -> Result<PathBuf> {
    let existing = || -> Option<PathBuf> {
        std::fs::read_dir(dir)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("linux-image-") && n.ends_with(".deb"))
            })
            .max()
    };
    if let Some(deb) = existing() {
        return Ok(deb);
    }
    // The versioned package `linux-image-amd64` depends on.
    let out = Command::new("apt-cache")
        .args(["depends", META_PACKAGE])
        .output()
        .context("download failed: apt-cache runs")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let package = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-") && !p.contains("signed"))
        .map(str::to_owned)
        .with_context(|| format!("download failed: no kernel package named by `apt-cache depends {META_PACKAGE}` (apt-get update?)"))?;
    let out = Command::new("apt-get")
        .args(["download", &package])
        .current_dir(dir)
        .output()
        .context("download failed: apt-get runs")?;
    match existing() {
        Some(deb) if out.status.success() => Ok(deb),
        _ => bail!(
            "download failed: `apt-get download {package}`: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    }
}

/// The package's `/boot/vmlinuz-VERSION`, by `dpkg-deb --fsys-tarfile` and
/// `tar`.
fn extract_bzimage(deb: &Path, dir: &Path, version: &str) -> Result<PathBuf> {
    let out = dir.join(format!("vmlinuz-{version}"));
    if out.exists() {
        return Ok(out);
    }
    let tmp = dir.join(format!("vmlinuz-{version}.part"));
    let script = format!(
        "set -o pipefail 2>/dev/null; dpkg-deb --fsys-tarfile '{}' | tar -xO ./boot/vmlinuz-{version} > '{}'",
        deb.display(),
        tmp.display()
    );
    let status = Command::new("bash").args(["-c", &script]).status()?;
    ensure!(
        status.success(),
        "extracting /boot/vmlinuz-{version} from {}",
        deb.display()
    );
    std::fs::rename(&tmp, &out)?;
    Ok(out)
}

/// The ELF inside a bzImage whose payload is xz-compressed: the first xz
/// stream (magic FD 37 7A 58 5A 00) that unpacks to an ELF.
pub fn unpack_vmlinux(bzimage: &[u8]) -> Result<Vec<u8>> {
    const XZ: &[u8] = b"\xfd7zXZ\x00";
    let mut from = 0;
    while let Some(at) = bzimage[from..]
        .windows(XZ.len())
        .position(|w| w == XZ)
        .map(|i| from + i)
    {
        let mut child = Command::new("xz")
            .args(["-dc", "--single-stream"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("xz runs (Debian package xz-utils)")?;
        let mut stdin = child.stdin.take().expect("piped");
        let payload = bzimage[at..].to_vec();
        let feeder = std::thread::spawn(move || {
            use std::io::Write;
            // xz stops reading after the stream: a broken pipe is fine.
            let _ = stdin.write_all(&payload);
        });
        let out = child.wait_with_output()?;
        let _ = feeder.join();
        if out.status.success() && out.stdout.starts_with(b"\x7fELF") {
            return Ok(out.stdout);
        }
        from = at + 1;
    }
    bail!("no xz-compressed ELF in the bzImage (is it xz-compressed?)")
}

/// A copy of a 64-bit ELF with only its program headers and the bytes of
/// its loadable segments up to their last non-zero byte (the rest of each
/// is zero-filled memory, `p_memsz` unchanged): Debian's vmlinux is 63 MiB
/// on disk, 30 MiB of it zeros (`.bss` lies in the file because a section
/// after it has contents). PT_NOTE headers (the PVH entry note) follow the
/// segment they lie in. Section headers are dropped.
pub fn trim_elf(elf: &[u8]) -> Result<Vec<u8>> {
    let u16_at = |o: usize| -> Result<u16> {
        Ok(u16::from_le_bytes(
            elf.get(o..o + 2).context("truncated ELF")?.try_into()?,
        ))
    };
    let u32_at = |o: usize| -> Result<u32> {
        Ok(u32::from_le_bytes(
            elf.get(o..o + 4).context("truncated ELF")?.try_into()?,
        ))
    };
    let u64_at = |o: usize| -> Result<u64> {
        Ok(u64::from_le_bytes(
            elf.get(o..o + 8).context("truncated ELF")?.try_into()?,
        ))
    };
    ensure!(
        elf.starts_with(b"\x7fELF\x02\x01"),
        "not a 64-bit little-endian ELF"
    );
    let phoff = u64_at(0x20)? as usize;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    ensure!(
        phentsize == 56,
        "unexpected program header size {phentsize}"
    );
    struct Ph {
        kind: u32,
        offset: u64,
        filesz: u64,
        raw: Vec<u8>,
    }
    let mut phs = Vec::new();
    for i in 0..phnum {
        let at = phoff + i * 56;
        phs.push(Ph {
            kind: u32_at(at)?,
            offset: u64_at(at + 8)?,
            filesz: u64_at(at + 32)?,
            raw: elf.get(at..at + 56).context("truncated ELF")?.to_vec(),
        });
    }
    let mut out = elf[..64].to_vec();
    // Program headers right after the ELF header; no section headers.
    out[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
    out[0x28..0x30].fill(0);
    out[0x3a..0x40].fill(0); // e_shentsize, e_shnum, e_shstrndx
    out.resize(64 + phnum * 56, 0);
    // (old offset, old size, new offset) of each loadable segment.
    let mut moved = Vec::new();
    for ph in phs.iter_mut().filter(|p| p.kind == 1) {
        let bytes = elf
            .get(ph.offset as usize..(ph.offset + ph.filesz) as usize)
            .context("a segment outside the file")?;
        let used = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        // Keep the offset congruent to the old one modulo the page size.
        let mut at = out.len() as u64;
        at += (ph.offset.wrapping_sub(at)) % 4096;
        out.resize(at as usize, 0);
        out.extend_from_slice(&bytes[..used]);
        moved.push((ph.offset, ph.filesz, at));
        ph.raw[8..16].copy_from_slice(&at.to_le_bytes());
        ph.raw[32..40].copy_from_slice(&(used as u64).to_le_bytes());
    }
    for ph in phs.iter_mut().filter(|p| p.kind != 1) {
        let home = moved
            .iter()
            .find(|(old, size, _)| *old <= ph.offset && ph.offset + ph.filesz <= old + size);
        match home {
            Some((old, _, new)) => {
                let at = new + (ph.offset - old);
                ensure!(
                    (at + ph.filesz) as usize <= out.len(),
                    "a note in the zeros trimmed off"
                );
                ph.raw[8..16].copy_from_slice(&at.to_le_bytes());
            }
            // Outside every loadable segment: not needed to boot.
            None => ph.raw[0..4].fill(0), // PT_NULL
        }
    }
    for (i, ph) in phs.iter().enumerate() {
        out[64 + i * 56..64 + (i + 1) * 56].copy_from_slice(&ph.raw);
    }
    Ok(out)
}

/// `tests/kernels/linux-init.c` built static with no C library.
fn build_init(dir: &Path) -> Result<PathBuf> {
    let source = crate::paths::repo().join("tests/kernels/linux-init.c");
    let out = dir.join("init");
    let status = Command::new("gcc")
        .args([
            "-static",
            "-nostdlib",
            "-ffreestanding",
            "-fno-stack-protector",
            "-fno-pie",
            "-no-pie",
            "-O2",
            "-Wall",
            "-Werror",
            "-o",
        ])
        .arg(&out)
        .arg(&source)
        .status()
        .context("gcc runs (Debian package gcc)")?;
    ensure!(status.success(), "gcc failed on {}", source.display());
    Ok(out)
}

/// One member of a cpio archive.
pub struct Entry {
    name: String,
    mode: u32,
    rdev: (u32, u32),
    data: Vec<u8>,
}

impl Entry {
    pub fn dir(name: &str) -> Self {
        Self {
            name: name.into(),
            mode: 0o040_755,
            rdev: (0, 0),
            data: Vec::new(),
        }
    }

    pub fn char_device(name: &str, major: u32, minor: u32) -> Self {
        Self {
            name: name.into(),
            mode: 0o020_600,
            rdev: (major, minor),
            data: Vec::new(),
        }
    }

    pub fn file(name: &str, perm: u32, data: Vec<u8>) -> Self {
        Self {
            name: name.into(),
            mode: 0o100_000 | perm,
            rdev: (0, 0),
            data,
        }
    }
}

/// A cpio archive in the "new ASCII" (newc) format Linux unpacks as an
/// initramfs: each member a 110-byte header of hex fields, its name and
/// data each padded to 4 bytes, then `TRAILER!!!`.
pub fn cpio(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    let trailer = Entry::file("TRAILER!!!", 0, Vec::new());
    for (ino, e) in entries.iter().chain([&trailer]).enumerate() {
        let trailer = std::ptr::eq(e, &trailer);
        let fields = [
            if trailer { 0 } else { ino as u32 + 1 },
            if trailer { 0 } else { e.mode },
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime
            e.data.len() as u32,
            0, // devmajor
            0, // devminor
            e.rdev.0,
            e.rdev.1,
            e.name.len() as u32 + 1,
            0, // check
        ];
        out.extend_from_slice(b"070701");
        for f in fields {
            out.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        out.extend_from_slice(e.name.as_bytes());
        out.push(0);
        out.resize(out.len().next_multiple_of(4), 0);
        out.extend_from_slice(&e.data);
        out.resize(out.len().next_multiple_of(4), 0);
    }
    out.resize(out.len().next_multiple_of(512), 0);
    out
}

/// Two numbers read from a log: `(start TSC, /init's TSC)` or `(ns slept,
/// exits)`.
pub type Pair = Option<(u64, u64)>;

/// The figures of a Linux run's log: `(start TSC, /init's TSC)`, and
/// `(ns slept, exits)` of /init's idle line when there is one.
pub fn figures(log_lines: &[String]) -> (Pair, Pair) {
    let number_after = |line: &str, key: &str| -> Option<u64> {
        let rest = &line[line.find(key)? + key.len()..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    };
    let start = log_lines
        .iter()
        .find_map(|l| number_after(l, "domain 1 starts at TSC "));
    let init = log_lines
        .iter()
        .find_map(|l| number_after(l, &format!("{INIT_LINE}, tsc ")));
    let idle = log_lines.iter().find_map(|l| {
        let ns = number_after(l, "parallax-init: idle ")?;
        let exits = number_after(l, " ns, ")?;
        Some((ns, exits))
    });
    (start.zip(init), idle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cpio_member_is_a_newc_header_its_name_and_data_padded() {
        let a = cpio(&[Entry::file("init", 0o755, b"abc".to_vec())]);
        assert_eq!(&a[..6], b"070701");
        assert_eq!(&a[6..14], b"00000001", "inode");
        assert_eq!(&a[14..22], b"000081ED", "regular file, 0755");
        assert_eq!(&a[54..62], b"00000003", "file size");
        assert_eq!(&a[94..102], b"00000005", "name size with its NUL");
        assert_eq!(&a[110..115], b"init\0");
        // 115 bytes padded to 116, then the data.
        assert_eq!(&a[116..119], b"abc");
        assert_eq!(&a[120..126], b"070701", "the trailer at the next 4 bytes");
        assert!(a.windows(10).any(|w| w == b"TRAILER!!!"));
        assert_eq!(a.len() % 512, 0);
        let dev = cpio(&[Entry::char_device("dev/console", 5, 1)]);
        assert_eq!(&dev[14..22], b"00002180", "character device, 0600");
        assert_eq!(&dev[78..86], b"00000005", "rdevmajor");
        assert_eq!(&dev[86..94], b"00000001", "rdevminor");
    }

    /// An ELF with two loadable segments, the first holding a note, the
    /// second ending in zeros.
    fn elf() -> Vec<u8> {
        let mut e = vec![0u8; 0x3000];
        e[..6].copy_from_slice(b"\x7fELF\x02\x01");
        e[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        e[0x28..0x30].copy_from_slice(&0x2f00u64.to_le_bytes()); // shoff
        e[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        e[0x38..0x3a].copy_from_slice(&3u16.to_le_bytes());
        e[0x3c..0x3e].copy_from_slice(&5u16.to_le_bytes());
        let ph = |e: &mut Vec<u8>, i: usize, kind: u32, off: u64, filesz: u64, memsz: u64| {
            let at = 64 + i * 56;
            e[at..at + 4].copy_from_slice(&kind.to_le_bytes());
            e[at + 8..at + 16].copy_from_slice(&off.to_le_bytes());
            e[at + 24..at + 32].copy_from_slice(&(0x100_0000 + off).to_le_bytes());
            e[at + 32..at + 40].copy_from_slice(&filesz.to_le_bytes());
            e[at + 40..at + 48].copy_from_slice(&memsz.to_le_bytes());
        };
        ph(&mut e, 0, 1, 0x1000, 0x800, 0x800);
        ph(&mut e, 1, 4, 0x1100, 0x20, 0x20);
        ph(&mut e, 2, 1, 0x2000, 0x1000, 0x4000);
        e[0x1000..0x1800].fill(0xaa);
        e[0x1100..0x1120].fill(0x4e);
        e[0x2000..0x2010].fill(0xbb);
        e
    }

    #[test]
    fn trimming_keeps_the_loaded_bytes_and_the_note() {
        let t = trim_elf(&elf()).unwrap();
        let u64_at = |o: usize| u64::from_le_bytes(t[o..o + 8].try_into().unwrap());
        assert_eq!(u64_at(0x28), 0, "no section headers");
        // Segment 0: its 0x800 bytes, at an offset congruent to 0x1000.
        let (off0, size0) = (u64_at(64 + 8) as usize, u64_at(64 + 32));
        assert_eq!((off0 % 4096, size0), (0, 0x800));
        assert_eq!(u64_at(64 + 40), 0x800);
        // The note moved with it.
        let note = u64_at(64 + 56 + 8) as usize;
        assert_eq!(note, off0 + 0x100);
        assert_eq!(&t[note..note + 0x20], &[0x4e; 0x20]);
        // Segment 2: 16 bytes in the file, 0x4000 in memory.
        let (off2, size2, mem2) = (
            u64_at(64 + 112 + 8) as usize,
            u64_at(64 + 112 + 32),
            u64_at(64 + 112 + 40),
        );
        assert_eq!((size2, mem2), (0x10, 0x4000));
        assert_eq!(&t[off2..off2 + 0x10], &[0xbb; 0x10]);
        assert!(t.len() < 0x2100);
        assert!(trim_elf(b"\x7fELF\x01\x01").is_err(), "32-bit");
    }

    #[test]
    fn the_figures_come_from_the_vmm_and_init_lines() {
        let lines: Vec<String> = [
            "vmm INFO domain 1 starts at TSC 1000",
            "dom1 parallax-init: /init runs, tsc 51000",
            "dom1 parallax-init: idle 2000000000 ns, 37 exits",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            figures(&lines),
            (Some((1000, 51000)), Some((2_000_000_000, 37)))
        );
        assert_eq!(figures(&lines[..1]), (None, None));
    }
}
