//! ACPI tables for a guest: what its kernel finds to learn that there is no
//! PC firmware to ask and how to power the machine off. Built by init into
//! the last KiB below 640 KiB (the EBDA, reserved in the memory map), where
//! the BIOS data area's EBDA pointer (0x40e) and the PC's RSDP search find
//! them; multiboot2 kernels also get copies of the RSDP (tags 14 and 15),
//! PVH kernels its address.
//!
//! The tables: an RSDP (revision 2), an RSDT and an XSDT listing the FADT
//! and the MADT, the FADT (revision 3, no SMI command port: ACPI mode is on; the PM1a
//! event block at port 0x600 and control block at 0x604, as QEMU's q35;
//! legacy devices present, no 8042), its FACS, and a DSDT whose only object
//! is `\_S5` (SLP_TYP 0: writing `SLP_EN | 0 << 10` to PM1a control powers
//! off), and a MADT: the local APIC at [`LAPIC_BASE`] (one processor, APIC
//! ID 0, enabled) with the 8259 PICs beside it (PCAT_COMPAT), the I/O APIC
//! at [`IOAPIC_BASE`] and QEMU's interrupt source overrides (IRQ 0 on GSI 2,
//! IRQ 9 level, active high).

/// Where the tables go (the EBDA).
pub const TABLES_GPA: u64 = 0x9_fc00;
/// The BIOS data area's word holding the EBDA's segment.
pub const EBDA_POINTER: u64 = 0x40e;
/// Bytes of the tables.
pub const TABLES_LEN: usize = 0x300;
/// The local APIC's registers (xAPIC MMIO), as the MADT gives them.
pub const LAPIC_BASE: u32 = 0xfee0_0000;
/// The I/O APIC's registers, as the MADT gives them (ID 0, GSI base 0).
pub const IOAPIC_BASE: u32 = 0xfec0_0000;
/// The PM1a event block (status, enable) ports.
pub const PM1A_EVT: u16 = 0x600;
/// The PM1a control block port.
pub const PM1A_CNT: u16 = 0x604;
/// PM1 control: sleep enable, and the sleep type's field.
pub const SLP_EN: u16 = 1 << 13;
/// The sleep type of S5 (soft off) in `\_S5`.
pub const SLP_TYP_S5: u16 = 0;

const RSDP: usize = 0x00;
const RSDT: usize = 0x30;
const XSDT: usize = 0x60;
const FADT: usize = 0xa0;
const FACS: usize = 0x1c0;
const DSDT: usize = 0x200;
const MADT: usize = 0x240;
const FADT_LEN: usize = 244;
/// The tables the RSDT and XSDT list.
const LISTED: [usize; 2] = [FADT, MADT];
/// `Name (_S5, Package (4) { 0, 0, 0, 0 })`.
const S5_AML: [u8; 12] = [
    0x08, b'_', b'S', b'5', b'_', 0x12, 0x06, 0x04, 0x00, 0x00, 0x00, 0x00,
];

fn sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |s, &b| s.wrapping_add(b))
}

/// A table header at `at` (its checksum set by [`seal`]).
fn header(out: &mut [u8], at: usize, signature: &[u8; 4], len: usize, revision: u8) {
    out[at..at + 4].copy_from_slice(signature);
    out[at + 4..at + 8].copy_from_slice(&(len as u32).to_le_bytes());
    out[at + 8] = revision;
    out[at + 10..at + 16].copy_from_slice(b"PRLLAX");
    out[at + 16..at + 24].copy_from_slice(b"PARALLAX");
    out[at + 24..at + 28].copy_from_slice(&1u32.to_le_bytes());
    out[at + 28..at + 32].copy_from_slice(b"PRLX");
    out[at + 32..at + 36].copy_from_slice(&1u32.to_le_bytes());
}

/// Sets the checksum byte (at `at + 9`, for tables) so the bytes sum to 0.
fn seal(out: &mut [u8], at: usize, len: usize, checksum_at: usize) {
    out[checksum_at] = 0;
    out[checksum_at] = 0u8.wrapping_sub(sum(&out[at..at + len]));
}

/// A generic address structure for an I/O port block.
fn gas_io(out: &mut [u8], at: usize, bits: u8, port: u16) {
    out[at] = 1; // system I/O
    out[at + 1] = bits;
    out[at + 3] = if bits == 32 { 3 } else { 2 }; // dword or word access
    out[at + 4..at + 12].copy_from_slice(&u64::from(port).to_le_bytes());
}

/// Builds the tables as they lie at [`TABLES_GPA`]; `out` must hold
/// [`TABLES_LEN`] bytes.
pub fn build(out: &mut [u8; TABLES_LEN]) {
    out.fill(0);
    let base = TABLES_GPA;
    let addr = |off: usize| base + off as u64;
    let put32 =
        |out: &mut [u8], at: usize, v: u32| out[at..at + 4].copy_from_slice(&v.to_le_bytes());
    let put64 =
        |out: &mut [u8], at: usize, v: u64| out[at..at + 8].copy_from_slice(&v.to_le_bytes());
    // DSDT.
    let dsdt_len = 36 + S5_AML.len();
    header(out, DSDT, b"DSDT", dsdt_len, 2);
    out[DSDT + 36..DSDT + dsdt_len].copy_from_slice(&S5_AML);
    seal(out, DSDT, dsdt_len, DSDT + 9);
    // FACS (no checksum).
    out[FACS..FACS + 4].copy_from_slice(b"FACS");
    put32(out, FACS + 4, 64);
    out[FACS + 32] = 1; // version
    // FADT.
    header(out, FADT, b"FACP", FADT_LEN, 3);
    let f = FADT;
    put32(out, f + 36, addr(FACS) as u32);
    put32(out, f + 40, addr(DSDT) as u32);
    out[f + 46..f + 48].copy_from_slice(&9u16.to_le_bytes()); // SCI: IRQ 9
    put32(out, f + 56, u32::from(PM1A_EVT));
    put32(out, f + 64, u32::from(PM1A_CNT));
    out[f + 88] = 4; // PM1 event block length
    out[f + 89] = 2; // PM1 control block length
    out[f + 96..f + 98].copy_from_slice(&101u16.to_le_bytes()); // no C2
    out[f + 98..f + 100].copy_from_slice(&1001u16.to_le_bytes()); // no C3
    out[f + 108] = 0x32; // the CMOS century register
    out[f + 109..f + 111].copy_from_slice(&1u16.to_le_bytes()); // legacy devices, no 8042
    // WBINVD, C1 on all processors, power and sleep buttons not fixed.
    put32(out, f + 112, (1 << 0) | (1 << 2) | (1 << 4) | (1 << 5));
    put64(out, f + 132, addr(FACS));
    put64(out, f + 140, addr(DSDT));
    gas_io(out, f + 148, 32, PM1A_EVT);
    gas_io(out, f + 172, 16, PM1A_CNT);
    seal(out, FADT, FADT_LEN, FADT + 9);
    // MADT: the local APIC's address, PCAT_COMPAT (the PICs are there
    // too), then one processor local APIC structure (ACPI processor ID 0,
    // APIC ID 0, enabled), the I/O APIC (ID 0 at IOAPIC_BASE, GSI base 0)
    // and, as QEMU's, the interrupt source overrides: ISA IRQ 0 (the PIT)
    // on GSI 2, edge as the bus is; IRQ 9 (the SCI) level, active high.
    let madt_len = 44 + 8 + 12 + 2 * 10;
    header(out, MADT, b"APIC", madt_len, 3);
    put32(out, MADT + 36, LAPIC_BASE);
    put32(out, MADT + 40, 1);
    out[MADT + 44..MADT + 52].copy_from_slice(&[0, 8, 0, 0, 1, 0, 0, 0]);
    out[MADT + 52..MADT + 56].copy_from_slice(&[1, 12, 0, 0]);
    put32(out, MADT + 56, IOAPIC_BASE);
    put32(out, MADT + 60, 0);
    // Type 2, length 10, bus 0 (ISA), source, GSI, flags.
    out[MADT + 64..MADT + 74].copy_from_slice(&[2, 10, 0, 0, 2, 0, 0, 0, 0, 0]);
    out[MADT + 74..MADT + 84].copy_from_slice(&[2, 10, 0, 9, 9, 0, 0, 0, 0x0d, 0]);
    seal(out, MADT, madt_len, MADT + 9);
    // RSDT and XSDT: the FADT and the MADT.
    let (rsdt_len, xsdt_len) = (36 + 4 * LISTED.len(), 36 + 8 * LISTED.len());
    header(out, RSDT, b"RSDT", rsdt_len, 1);
    header(out, XSDT, b"XSDT", xsdt_len, 1);
    for (n, &table) in LISTED.iter().enumerate() {
        put32(out, RSDT + 36 + 4 * n, addr(table) as u32);
        put64(out, XSDT + 36 + 8 * n, addr(table));
    }
    seal(out, RSDT, rsdt_len, RSDT + 9);
    seal(out, XSDT, xsdt_len, XSDT + 9);
    // RSDP: the first 20 bytes sum to 0, and all 36.
    out[RSDP..RSDP + 8].copy_from_slice(b"RSD PTR ");
    out[RSDP + 9..RSDP + 15].copy_from_slice(b"PRLLAX");
    out[RSDP + 15] = 2;
    put32(out, RSDP + 16, addr(RSDT) as u32);
    put32(out, RSDP + 20, 36);
    put64(out, RSDP + 24, addr(XSDT));
    seal(out, RSDP, 20, RSDP + 8);
    seal(out, RSDP, 36, RSDP + 32);
}

/// The RSDP's bytes within the tables (multiboot2 tag 14 takes the first
/// 20, tag 15 all 36).
pub fn rsdp(tables: &[u8; TABLES_LEN]) -> &[u8] {
    &tables[RSDP..RSDP + 36]
}
