//! Command line `introspect` (issue 13, points 1 and 6): the guest the
//! host introspects.
//!
//! It adds page tables of its own under PML4 slot 1 (guest-virtual
//! 0x80_0000_0000, 512 GiB): a 4 KiB page aliasing its marker page at
//! [`ALIAS`], a not-present page after it, and, where the CPU has 1 GiB
//! pages, a 1 GiB page mapping guest-physical 0 at [`GIB`]; its own
//! identity map (2 MiB pages) stays as it was. It prints the marker's
//! addresses and its CR3 (`introspect: marker gva ... gpa ... cr3 ...`),
//! then:
//! 1. waits until the host writes [`HELLO`] into the mailbox (through the
//!    alias, so that the write goes through the new tables) and prints
//!    `introspect: mailbox 0x...`;
//! 2. zeroes R12, sets the ready word, and spins until R12 is not zero:
//!    the host pauses the domain, sets R12, resumes it. Prints
//!    `introspect: r12 0x...`, then what its marker page reads now
//!    (`introspect: marker now ...`: the host may have switched it to a
//!    view that maps a shadow page there), and exits 0, unless the command
//!    line also says `vmi`, for the vmi-rs test (issue 13, point 5):
//! 3. zeroes R13 and writes a word of its marker page (offset 0x300) over
//!    and over until R13 is not zero: the host makes the page read-only
//!    in its view and answers the violation with R13 set, letting the
//!    write through once. Prints `introspect: r13 0x...`;
//! 4. spins until its marker page reads its marker again (the host's
//!    `reset_state` puts it back in view 0 while it runs), prints
//!    `introspect: marker back ...` and exits 0.

use core::sync::atomic::{Ordering, compiler_fence};
use guest_runtime::{Pages, cpuid, println};

/// The page the host reads and writes: the marker at 0, the mailbox at
/// 0x100, the ready word at 0x200.
static MARKER: Pages<1> = Pages::new();
/// The tables of PML4 slot 1.
static PDPT: Pages<1> = Pages::new();
static PD: Pages<1> = Pages::new();
static PT: Pages<1> = Pages::new();

/// Where the marker page is aliased (4 KiB page).
pub const ALIAS: u64 = 0x80_0000_0000;
/// Where guest-physical 0 is mapped with a 1 GiB page.
pub const GIB: u64 = 0x80_4000_0000;
/// What the host writes into the mailbox.
pub const HELLO: u64 = 0x005e_ed0f_1a7e;
const MARK: &[u8; 16] = b"parallax-marker!";

const P: u64 = 1;
const RW: u64 = 2;
const PS: u64 = 1 << 7;

pub fn introspect(vmi: bool) -> u32 {
    for (i, chunk) in MARK.chunks(8).enumerate() {
        MARKER.write_u64(0, i * 8, u64::from_le_bytes(chunk.try_into().unwrap()));
    }
    let cr3: u64;
    // Safety: reading CR3 has no side effect.
    unsafe { core::arch::asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack)) };
    let pml4 = cr3 & !0xfff;
    PT.write_u64(0, 0, MARKER.addr() | P | RW);
    PD.write_u64(0, 0, PT.addr() | P | RW);
    PDPT.write_u64(0, 0, PD.addr() | P | RW);
    let gib = cpuid(0x8000_0001, 0).edx & 1 << 26 != 0;
    if gib {
        PDPT.write_u64(0, 8, P | RW | PS);
    }
    // Safety: PML4 slot 1 is unused by the identity map (which is slot
    // 0); the new tables are static pages of this guest, identity mapped.
    unsafe {
        ((pml4 + 8) as *mut u64).write_volatile(PDPT.addr() | P | RW);
        core::arch::asm!("mov cr3, {}", in(reg) cr3, options(nostack));
    }
    // The alias reads the marker.
    // Safety: ALIAS maps the marker page (just above).
    let through = unsafe { (ALIAS as *const u64).read_volatile() };
    if through != MARKER.read_u64(0, 0) {
        println!("FAIL: introspect: the alias reads {through:#x}");
        return 1;
    }
    println!(
        "introspect: marker gva {:#x} gpa {:#x} alias {ALIAS:#x} cr3 {cr3:#x} 1gib at {GIB:#x} {gib}",
        MARKER.addr(),
        MARKER.addr()
    );
    let mut spins = 0u64;
    while MARKER.read_u64(0, 0x100) != HELLO {
        core::hint::spin_loop();
        spins += 1;
        if spins.is_multiple_of(50_000_000) {
            println!("introspect: still waiting for the mailbox");
        }
    }
    println!("introspect: mailbox {:#x}", MARKER.read_u64(0, 0x100));
    let ready = MARKER.addr() + 0x200;
    let r12: u64;
    compiler_fence(Ordering::SeqCst);
    // Safety: the loop only reads R12 and writes the ready word, a word of
    // this guest's marker page.
    unsafe {
        core::arch::asm!(
            "xor r12, r12",
            "mov qword ptr [{ready}], 1",
            "2:",
            "pause",
            "test r12, r12",
            "jz 2b",
            "mov {out}, r12",
            ready = in(reg) ready,
            out = out(reg) r12,
            out("r12") _,
            options(nostack),
        );
    }
    println!("introspect: r12 {r12:#x}");
    // The host may have put the vCPU in a view that maps a shadow page at
    // the marker's gfn: what the guest reads there now.
    let mut now = [0u8; 16];
    for (i, chunk) in now.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&MARKER.read_u64(0, i * 8).to_le_bytes());
    }
    let text = core::str::from_utf8(&now).unwrap_or("(not text)");
    println!("introspect: marker now {text}");
    if !vmi {
        return 0;
    }
    let word = MARKER.addr() + 0x300;
    let r13: u64;
    compiler_fence(Ordering::SeqCst);
    // Safety: the loop only writes a word of this guest's marker page and
    // reads R13.
    unsafe {
        core::arch::asm!(
            "xor r13, r13",
            "2:",
            "mov qword ptr [{word}], 1",
            "pause",
            "test r13, r13",
            "jz 2b",
            "mov {out}, r13",
            word = in(reg) word,
            out = out(reg) r13,
            out("r13") _,
            options(nostack),
        );
    }
    println!("introspect: r13 {r13:#x}");
    let mut spins = 0u64;
    while MARKER.read_u64(0, 0) != u64::from_le_bytes(MARK[..8].try_into().unwrap()) {
        core::hint::spin_loop();
        spins += 1;
        if spins.is_multiple_of(50_000_000) {
            println!("introspect: still waiting for the marker to come back");
        }
    }
    println!(
        "introspect: marker back {}",
        core::str::from_utf8(MARK).unwrap_or("")
    );
    0
}
