//! COM2 end to end on the real emulators, without the hypervisor: a tiny
//! multiboot2 kernel (assembled here with `as` and `ld`) echoes what arrives
//! on COM2; the test talks to it through the control socket the run offers,
//! as `cargo hv ctl` would, while the runner decodes COM1 as usual.
//!
//! These tests need `as`/`ld` (binutils), `grub-mkrescue`, QEMU and Bochs;
//! without binutils they say so and pass.

#[path = "../../client/tests/common/mod.rs"]
mod common;

use image_builder::emulator::{self, Machine, RunConfig, RunEnd};
use image_builder::iso::{self, IsoSpec};
use image_builder::logs::ElfSet;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Sets up COM2 (115200 8N1, FIFOs), then says `R\0` over and over until a
/// byte arrives; from then on echoes every byte, until `Q`, which ends the
/// machine (QEMU's exit port, then Bochs's shutdown port).
const ECHO_GUEST: &str = r#"
.code32
.text
.align 8
mb2_start:
  .long 0xe85250d6
  .long 0
  .long mb2_end - mb2_start
  .long -(0xe85250d6 + (mb2_end - mb2_start))
  .short 0, 0
  .long 8
mb2_end:
.globl _start
_start:
  mov $stack_top, %esp
  mov $0x2f9, %dx; xor %al, %al; out %al, %dx
  mov $0x2fb, %dx; mov $0x80, %al; out %al, %dx
  mov $0x2f8, %dx; mov $1, %al; out %al, %dx
  mov $0x2f9, %dx; xor %al, %al; out %al, %dx
  mov $0x2fb, %dx; mov $3, %al; out %al, %dx
  mov $0x2fa, %dx; mov $0xc7, %al; out %al, %dx
  mov $0x2fc, %dx; mov $3, %al; out %al, %dx
announce:
  mov $'R', %al
  call putc
  xor %al, %al
  call putc
  mov $200000, %ecx
1:mov $0x2fd, %dx
  in %dx, %al
  test $1, %al
  jnz echo
  loop 1b
  jmp announce
echo:
  mov $0x2fd, %dx
2:in %dx, %al
  test $1, %al
  jz 2b
  mov $0x2f8, %dx
  in %dx, %al
  cmp $'Q', %al
  je quit
  call putc
  jmp echo
putc:
  mov %al, %ah
  mov $0x2fd, %dx
3:in %dx, %al
  test $0x20, %al
  jz 3b
  mov $0x2f8, %dx
  mov %ah, %al
  out %al, %dx
  ret
quit:
  mov $0xf4, %dx
  xor %eax, %eax
  out %al, %dx
  mov $0x8900, %dx
  mov $shutdown, %esi
  mov $8, %ecx
  rep outsb
4:cli
  hlt
  jmp 4b
shutdown: .ascii "Shutdown"
.bss
.align 16
  .skip 4096
stack_top:
"#;

/// What the test sends, zero bytes included; the guest echoes it.
const PING: &[u8] = b"ping\0\x01\x02\x7f\0";

/// Builds the echo guest's ISO, or says why it cannot.
fn echo_iso() -> Option<PathBuf> {
    let dir = image_builder::paths::work_dir().join("com2-tests");
    std::fs::create_dir_all(&dir).unwrap();
    let id =
        format!("{}-{:?}", std::process::id(), std::thread::current().id()).replace(['(', ')'], "");
    let src = dir.join(format!("echo-{id}.s"));
    let obj = src.with_extension("o");
    let elf = src.with_extension("elf");
    std::fs::write(&src, ECHO_GUEST).unwrap();
    let run = |c: &mut Command| c.status().map(|s| s.success()).unwrap_or(false);
    if !run(Command::new("as").arg("--32").arg(&src).arg("-o").arg(&obj)) {
        eprintln!("SKIPPED: `as --32` is not available (package binutils)");
        return None;
    }
    assert!(
        run(Command::new("ld")
            .args(["-m", "elf_i386", "-Ttext=0x100000", "-e", "_start"])
            .arg(&obj)
            .arg("-o")
            .arg(&elf)),
        "ld failed"
    );
    let iso = src.with_extension("iso");
    iso::assemble(
        &IsoSpec {
            kernel: elf,
            cmdline: String::new(),
            modules: Vec::new(),
        },
        &iso,
    )
    .unwrap();
    Some(iso)
}

/// Connects to the run's control socket once it is there.
fn connect(path: &Path) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("no control socket at {}: {e}", path.display()),
        }
    }
}

/// Reads until `want` has come (skipping the guest's announcements).
fn read_until(s: &mut UnixStream, want: &[u8]) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !got.windows(want.len()).any(|w| w == want) {
        let n = s.read(&mut buf).expect("reading the control socket");
        assert!(n > 0, "the control socket closed after {got:?}");
        got.extend_from_slice(&buf[..n]);
    }
    got
}

fn echo_through_com2(machine: Machine) {
    let Some(iso) = echo_iso() else { return };
    image_builder::deps::ensure().unwrap();
    let mut cfg = RunConfig::new(machine, emulator::capture_path("com2"));
    cfg.timeout = Duration::from_secs(90);
    let socket = cfg.control_socket_path();
    let talker = std::thread::spawn(move || {
        let mut s = connect(&socket);
        // Announcements come whole: the proxy forwards from a frame boundary.
        let hello = read_until(&mut s, b"R\0");
        s.write_all(PING).unwrap();
        let echo = read_until(&mut s, PING);
        // While this client is attached, another is turned away.
        let mut other = UnixStream::connect(&socket).unwrap();
        let mut said = String::new();
        other.read_to_string(&mut said).unwrap();
        s.write_all(b"Q").unwrap();
        (hello, echo, said)
    });
    let outcome = emulator::run(&iso, &ElfSet::default(), &cfg).unwrap();
    let (hello, echo, said) = talker.join().unwrap();
    assert!(
        matches!(outcome.end, RunEnd::EmulatorExited { .. }),
        "the guest ended the machine: {}",
        outcome.summary()
    );
    // The client was attached before the guest spoke. On OVMF the
    // firmware's and GRUB's console text comes first: OVMF writes its console
    // to every serial port.
    if machine != Machine::QemuUefi {
        assert!(hello.starts_with(b"R\0"), "{hello:?}");
    }
    // What came back is the echo, after whole announcements.
    let before = &echo[..echo.len() - PING.len()];
    assert!(before.chunks(2).all(|c| c == b"R\0"), "{echo:?}");
    assert!(echo.ends_with(PING), "{echo:?}");
    assert!(said.contains("another client is attached"), "{said:?}");
    let stats = outcome.control.expect("the emulator connected COM2");
    assert_eq!(stats.clients, 1, "{stats:?}");
    assert_eq!(stats.turned_away, 1, "{stats:?}");
    assert_eq!(stats.to_console, PING.len() as u64 + 1, "{stats:?}");
    assert!(stats.to_clients >= PING.len() as u64, "{stats:?}");
    assert_eq!(
        outcome.control_socket.as_deref(),
        Some(cfg.control_socket_path().as_path())
    );
    assert!(
        !cfg.control_socket_path().exists(),
        "the socket is gone with the run"
    );
    // COM1 is still the log wire: GRUB's output arrived there.
    let com1 = std::fs::read(&outcome.capture).unwrap();
    assert!(
        String::from_utf8_lossy(&com1).contains("Booting"),
        "COM1 capture: {:?}",
        String::from_utf8_lossy(&com1)
    );
}

#[test]
fn com2_reaches_a_control_client_on_qemu() {
    echo_through_com2(Machine::Qemu);
}

#[test]
fn com2_reaches_a_control_client_on_qemu_uefi() {
    echo_through_com2(Machine::QemuUefi);
}

#[test]
fn com2_reaches_a_control_client_on_bochs() {
    echo_through_com2(Machine::Bochs);
}

#[test]
fn a_run_directory_too_deep_for_a_socket_falls_back_to_a_short_path() {
    let deep = std::env::temp_dir()
        .join("d".repeat(100))
        .join("deep-run-7.serial");
    let cfg = RunConfig::new(Machine::Qemu, deep);
    let p = cfg.control_socket_path();
    assert_eq!(p, std::env::temp_dir().join("parallax-deep-run-7.sock"));
    let shallow = RunConfig::new(Machine::Qemu, PathBuf::from("/w/runs/r-1.serial"));
    assert_eq!(
        shallow.control_socket_path(),
        Path::new("/w/runs/r-1.run/ctl.sock")
    );
    let mut given = shallow.clone();
    given.control_socket = Some(PathBuf::from("/x/ctl.sock"));
    assert_eq!(given.control_socket_path(), Path::new("/x/ctl.sock"));
}
