//! Guest-virtual to guest-physical translation through the guest's own page
//! tables, as the processor does it (Intel SDM Vol. 3A, chapter 4, "Paging"),
//! read through a caller-supplied [`GuestMemory`].
//!
//! - [`paging_mode`] finds the guest's paging mode from CR0, CR4 and
//!   IA32_EFER (SDM 4.1.1, Table 4-1).
//! - [`translate`] walks the tables from CR3 for one guest-virtual address
//!   and gives the guest-physical address, the page size, the rights the
//!   walk accumulated and every entry it read ([`Translation`]), or why it
//!   stopped ([`WalkError`]).
//!
//! Every table is the guest's, so every value is hostile: nothing here
//! panics on any input (the arithmetic is masks, constant shifts and
//! wrapping ones, and the crate denies clippy's indexing, arithmetic, unwrap
//! and panic lints outside its tests).
//!
//! What the walk does not do, as a reader of the guest's tables rather than
//! the processor: it sets no accessed or dirty flags, and it decides no
//! access (CR0.WP, SMEP, SMAP and protection keys are the caller's, from the
//! rights it reports). In PAE mode it reads the PDPTEs from memory, where
//! the processor uses the four it loaded at the last write of CR3 (with EPT,
//! the VMCS's guest PDPTE fields): the two differ only when the guest wrote
//! its PDPT since. 1-GiByte pages (CPUID.80000001H:EDX.Page1GB) and PSE-36
//! are taken as supported.

#![no_std]
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects,
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic
    )
)]

use core::fmt;

#[cfg(test)]
mod tests;

/// Guest-physical memory as the walker reads it: the guest's RAM, through
/// whatever mapping the caller has of it. An entry is always read at an
/// address aligned to its size, so a read never straddles two pages.
pub trait GuestMemory {
    /// Why a read failed (typically: the address is not guest RAM).
    type Error;
    /// The little-endian 8-byte value at `gpa` (PAE, 4- and 5-level entries).
    fn read_u64(&mut self, gpa: u64) -> Result<u64, Self::Error>;
    /// The little-endian 4-byte value at `gpa` (32-bit paging entries).
    fn read_u32(&mut self, gpa: u64) -> Result<u32, Self::Error>;
}

impl<M: GuestMemory + ?Sized> GuestMemory for &mut M {
    type Error = M::Error;
    fn read_u64(&mut self, gpa: u64) -> Result<u64, Self::Error> {
        (**self).read_u64(gpa)
    }
    fn read_u32(&mut self, gpa: u64) -> Result<u32, Self::Error> {
        (**self).read_u32(gpa)
    }
}

/// The MAXPHYADDR [`translate`] assumes: the architectural maximum (SDM
/// 4.1.4). An entry's address bits 51:M are reserved when M is below 52, so
/// with 52 none of them is (the bits above 51 are still checked where the
/// SDM reserves them, as in PAE entries); [`translate_with`] takes the
/// guest's own (CPUID.80000008H:EAX bits 7:0) to check them.
pub const MAXPHYADDR: u8 = 52;

/// A guest's paging mode (SDM 4.1.1, Table 4-1). The rights that depend on
/// IA32_EFER.NXE (SDM 4.1.3) come with the modes that have an XD bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Paging {
    /// CR0.PG = 0: linear addresses are physical (and 32 bits wide).
    Off,
    /// 32-bit paging (CR0.PG = 1, CR4.PAE = 0; SDM 4.3); `pse` is CR4.PSE,
    /// which makes a PDE with PS = 1 map a 4-MByte page.
    Legacy32 {
        /// CR4.PSE.
        pse: bool,
    },
    /// PAE paging (CR0.PG = 1, CR4.PAE = 1, IA32_EFER.LMA = 0; SDM 4.4).
    Pae {
        /// IA32_EFER.NXE: bit 63 of PDEs and PTEs is XD, else reserved.
        nxe: bool,
    },
    /// 4-level paging (IA-32e mode, CR4.LA57 = 0; SDM 4.5).
    Long4 {
        /// IA32_EFER.NXE: bit 63 of every entry is XD, else reserved.
        nxe: bool,
    },
    /// 5-level paging (IA-32e mode, CR4.LA57 = 1; SDM 4.5).
    Long5 {
        /// IA32_EFER.NXE: bit 63 of every entry is XD, else reserved.
        nxe: bool,
    },
}

/// CR0.PG (SDM 2.5).
pub const CR0_PG: u64 = 1 << 31;
/// CR4.PSE (SDM 2.5).
pub const CR4_PSE: u64 = 1 << 4;
/// CR4.PAE (SDM 2.5).
pub const CR4_PAE: u64 = 1 << 5;
/// CR4.LA57 (SDM 2.5).
pub const CR4_LA57: u64 = 1 << 12;
/// IA32_EFER.LME (SDM 2.2.1).
pub const EFER_LME: u64 = 1 << 8;
/// IA32_EFER.LMA (SDM 2.2.1).
pub const EFER_LMA: u64 = 1 << 10;
/// IA32_EFER.NXE (SDM 2.2.1).
pub const EFER_NXE: u64 = 1 << 11;

/// The paging mode of a guest with these control registers (SDM 4.1.1,
/// Table 4-1): CR0.PG = 0 is no paging; else CR4.PAE = 0 is 32-bit paging;
/// else IA-32e mode is 4- or 5-level paging by CR4.LA57, and outside it PAE
/// paging. IA-32e mode is IA32_EFER.LMA, which the processor sets when
/// CR0.PG becomes 1 with LME = 1 (and VM entry requires LMA = LME while
/// CR0.PG = 1, SDM 26.3.1.1), so it is what says that long mode is active.
pub fn paging_mode(cr0: u64, cr4: u64, efer: u64) -> Paging {
    let nxe = efer & EFER_NXE != 0;
    if cr0 & CR0_PG == 0 {
        Paging::Off
    } else if cr4 & CR4_PAE == 0 {
        Paging::Legacy32 {
            pse: cr4 & CR4_PSE != 0,
        }
    } else if efer & EFER_LMA == 0 {
        Paging::Pae { nxe }
    } else if cr4 & CR4_LA57 == 0 {
        Paging::Long4 { nxe }
    } else {
        Paging::Long5 { nxe }
    }
}

impl fmt::Display for Paging {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Paging::Off => "paging off",
            Paging::Legacy32 { pse: false } => "32-bit paging",
            Paging::Legacy32 { pse: true } => "32-bit paging with PSE",
            Paging::Pae { .. } => "PAE paging",
            Paging::Long4 { .. } => "4-level paging",
            Paging::Long5 { .. } => "5-level paging",
        })
    }
}

/// A level of the paging structures, named by its entries (SDM 4.3-4.5).
/// 32-bit paging has the last two (its page directory and page tables).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Level {
    /// PML5 entry (5-level paging), linear-address bits 56:48.
    Pml5,
    /// PML4 entry (4- and 5-level paging), linear-address bits 47:39.
    Pml4,
    /// Page-directory-pointer-table entry: bits 38:30 (bits 31:30 in PAE).
    Pdpt,
    /// Page-directory entry: bits 29:21 (bits 31:22 in 32-bit paging).
    Pd,
    /// Page-table entry: bits 20:12 (bits 21:12 in 32-bit paging).
    Pt,
}

impl Level {
    /// The SDM's name of an entry of this level ("PML4E", "PDE", ...).
    pub fn name(self) -> &'static str {
        match self {
            Level::Pml5 => "PML5E",
            Level::Pml4 => "PML4E",
            Level::Pdpt => "PDPTE",
            Level::Pd => "PDE",
            Level::Pt => "PTE",
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One paging-structure entry the walk read: its level, where it is, and
/// its value (a 4-byte entry of 32-bit paging zero-extended).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Entry {
    /// Its level.
    pub level: Level,
    /// The guest-physical address it was read from.
    pub gpa: u64,
    /// Its value.
    pub value: u64,
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} at gpa {:#x} = {:#x}",
            self.level, self.gpa, self.value
        )
    }
}

/// The entries a walk read, outermost first: at most five, no allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Path {
    entries: [Entry; 5],
    len: usize,
}

impl Path {
    const EMPTY: Self = Self {
        entries: [Entry {
            level: Level::Pml5,
            gpa: 0,
            value: 0,
        }; 5],
        len: 0,
    };

    /// The entries, outermost first.
    pub fn entries(&self) -> &[Entry] {
        self.entries.get(..self.len).unwrap_or(&[])
    }

    /// The last entry: the one that mapped the page.
    pub fn leaf(&self) -> Option<&Entry> {
        self.entries().last()
    }

    fn push(&mut self, entry: Entry) {
        if let Some(slot) = self.entries.get_mut(self.len) {
            *slot = entry;
            self.len = self.len.saturating_add(1);
        }
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, entry) in self.entries().iter().enumerate() {
            if i > 0 {
                f.write_str(" -> ")?;
            }
            write!(f, "{entry}")?;
        }
        Ok(())
    }
}

/// The size of a page a translation landed in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PageSize {
    /// 4 KiB: a PTE (also the answer with paging off).
    Size4KiB,
    /// 2 MiB: a PDE with PS = 1 in PAE, 4- and 5-level paging.
    Size2MiB,
    /// 4 MiB: a PDE with PS = 1 in 32-bit paging with CR4.PSE = 1.
    Size4MiB,
    /// 1 GiB: a PDPTE with PS = 1 in 4- and 5-level paging.
    Size1GiB,
}

impl PageSize {
    /// Its size in bytes.
    pub const fn bytes(self) -> u64 {
        match self {
            PageSize::Size4KiB => 1 << 12,
            PageSize::Size2MiB => 1 << 21,
            PageSize::Size4MiB => 1 << 22,
            PageSize::Size1GiB => 1 << 30,
        }
    }

    /// The mask of the offset within such a page.
    pub const fn offset_mask(self) -> u64 {
        self.bytes().wrapping_sub(1)
    }
}

/// A successful translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Translation {
    /// The guest-physical address the guest-virtual address maps to.
    pub gpa: u64,
    /// The size of the page it is in (`gpa & !size.offset_mask()` is the
    /// page's base).
    pub size: PageSize,
    /// R/W was 1 in every entry that has it (SDM 4.6.1): writes are allowed
    /// (user writes always; supervisor writes are allowed anyway when
    /// CR0.WP = 0).
    pub writable: bool,
    /// U/S was 1 in every entry that has it (SDM 4.6.1): a user-mode
    /// address.
    pub user: bool,
    /// XD was 1 in some entry with IA32_EFER.NXE = 1 (SDM 4.6.1):
    /// instruction fetches are not allowed. Always false in 32-bit paging,
    /// which has no XD bit.
    pub no_execute: bool,
    /// The entries read, outermost first (none with paging off).
    pub path: Path,
}

/// Why a walk stopped. `E` is the [`GuestMemory`]'s error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WalkError<E> {
    /// The entry's P flag is 0 (the guest would take a #PF with P = 0).
    NotPresent(Entry),
    /// The entry is present and has reserved bits set (the guest would take
    /// a #PF with RSVD = 1; SDM 4.7): `bits` are those set.
    Reserved {
        /// The entry.
        entry: Entry,
        /// Its reserved bits that are 1.
        bits: u64,
    },
    /// In 4-level (`width` 48) or 5-level (`width` 57) paging, bits 63 down
    /// to `width` of the address are not all equal to bit `width - 1` (SDM
    /// 3.3.7.1): the guest would take a #GP, not a walk.
    NonCanonical {
        /// The address.
        gva: u64,
        /// The width of linear addresses: 48 or 57.
        width: u8,
    },
    /// With paging off or in 32-bit or PAE paging, linear addresses are 32
    /// bits wide, and this one is not.
    AboveFourGiB {
        /// The address.
        gva: u64,
    },
    /// Reading an entry failed: the guest-physical address is not guest
    /// memory the caller can read (a CR3 or entry pointing outside RAM).
    Memory {
        /// The level of the entry being read.
        level: Level,
        /// Where it would be.
        gpa: u64,
        /// The memory's error.
        error: E,
    },
}

impl<E> WalkError<E> {
    /// The entry the walk stopped at, where it read one.
    pub fn entry(&self) -> Option<&Entry> {
        match self {
            WalkError::NotPresent(entry) | WalkError::Reserved { entry, .. } => Some(entry),
            _ => None,
        }
    }

    /// The same error with the memory's error mapped by `g`.
    pub fn map_memory<F, G: FnOnce(E) -> F>(self, g: G) -> WalkError<F> {
        match self {
            WalkError::NotPresent(entry) => WalkError::NotPresent(entry),
            WalkError::Reserved { entry, bits } => WalkError::Reserved { entry, bits },
            WalkError::NonCanonical { gva, width } => WalkError::NonCanonical { gva, width },
            WalkError::AboveFourGiB { gva } => WalkError::AboveFourGiB { gva },
            WalkError::Memory { level, gpa, error } => WalkError::Memory {
                level,
                gpa,
                error: g(error),
            },
        }
    }
}

impl<E: fmt::Display> fmt::Display for WalkError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WalkError::NotPresent(entry) => write!(f, "not present: {entry}"),
            WalkError::Reserved { entry, bits } => {
                write!(f, "reserved bits {bits:#x} set: {entry}")
            }
            WalkError::NonCanonical { gva, width } => {
                write!(
                    f,
                    "gva {gva:#x} is not canonical ({width}-bit linear addresses)"
                )
            }
            WalkError::AboveFourGiB { gva } => {
                write!(f, "gva {gva:#x} is above 4 GiB (32-bit linear addresses)")
            }
            WalkError::Memory { level, gpa, error } => {
                write!(f, "cannot read the {level} at gpa {gpa:#x}: {error}")
            }
        }
    }
}

impl<E: core::error::Error + 'static> core::error::Error for WalkError<E> {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            WalkError::Memory { error, .. } => Some(error),
            _ => None,
        }
    }
}

// Entry flags (SDM 4.3-4.5, Tables 4-4 to 4-6, 4-8 to 4-11, 4-14 to 4-20).
const P: u64 = 1 << 0;
const RW: u64 = 1 << 1;
const US: u64 = 1 << 2;
const PS: u64 = 1 << 7;
const XD: u64 = 1 << 63;

/// Bits `hi:lo` (inclusive, `hi` at most 63); none when `lo > hi`.
const fn bits(hi: u32, lo: u32) -> u64 {
    if lo > hi {
        return 0;
    }
    u64::MAX.wrapping_shr(63u32.saturating_sub(hi)) & u64::MAX.wrapping_shl(lo)
}

/// Translates `gva` through the guest's page tables rooted at `cr3` in mode
/// `paging`, reading them from `mem`, with MAXPHYADDR taken as
/// [`MAXPHYADDR`] (52: no address bit below 52 counts as beyond it).
///
/// With paging off the answer is the identity (a 4-KiB page, every right);
/// otherwise the walk follows SDM 4.3 (32-bit), 4.4 (PAE) or 4.5 (4- and
/// 5-level paging), checking each entry's P flag and then its reserved bits
/// (SDM 4.7), and stops at the first entry that maps a page.
pub fn translate<M: GuestMemory>(
    mem: &mut M,
    paging: Paging,
    cr3: u64,
    gva: u64,
) -> Result<Translation, WalkError<M::Error>> {
    translate_with(mem, paging, cr3, gva, MAXPHYADDR)
}

/// [`translate`] for a guest whose MAXPHYADDR (CPUID.80000008H:EAX bits 7:0)
/// is `maxphyaddr`: the physical-address bits of entries at and above it
/// are reserved (SDM 4.1.4), and 32-bit paging's 4-MByte pages reach
/// min(`maxphyaddr`, 40) bits (PSE-36, SDM 4.3). Values outside 32..=52 are
/// taken as the nearest of those.
pub fn translate_with<M: GuestMemory>(
    mem: &mut M,
    paging: Paging,
    cr3: u64,
    gva: u64,
    maxphyaddr: u8,
) -> Result<Translation, WalkError<M::Error>> {
    let m = u32::from(maxphyaddr.clamp(32, 52));
    match paging {
        Paging::Off => {
            if gva > u64::from(u32::MAX) {
                return Err(WalkError::AboveFourGiB { gva });
            }
            Ok(Translation {
                gpa: gva,
                size: PageSize::Size4KiB,
                writable: true,
                user: true,
                no_execute: false,
                path: Path::EMPTY,
            })
        }
        Paging::Legacy32 { pse } => walk32(mem, pse, cr3, gva, m),
        Paging::Pae { nxe } => walk_pae(mem, nxe, cr3, gva, m),
        Paging::Long4 { nxe } => walk_long(mem, nxe, cr3, gva, m, false),
        Paging::Long5 { nxe } => walk_long(mem, nxe, cr3, gva, m, true),
    }
}

/// The rights accumulated over a walk (SDM 4.6.1).
struct Rights {
    writable: bool,
    user: bool,
    no_execute: bool,
}

impl Rights {
    const ALL: Self = Self {
        writable: true,
        user: true,
        no_execute: false,
    };

    /// Takes in an entry's R/W, U/S and (when `nxe`) XD.
    fn add(&mut self, value: u64, nxe: bool) {
        self.writable &= value & RW != 0;
        self.user &= value & US != 0;
        self.no_execute |= nxe && value & XD != 0;
    }

    fn finish(self, gpa: u64, size: PageSize, path: Path) -> Translation {
        Translation {
            gpa,
            size,
            writable: self.writable,
            user: self.user,
            no_execute: self.no_execute,
            path,
        }
    }
}

/// Reads the 8-byte entry at `gpa`, records it in `path`, and checks its P
/// flag.
fn read_entry<M: GuestMemory>(
    mem: &mut M,
    level: Level,
    gpa: u64,
    path: &mut Path,
) -> Result<Entry, WalkError<M::Error>> {
    let value = mem
        .read_u64(gpa)
        .map_err(|error| WalkError::Memory { level, gpa, error })?;
    present(Entry { level, gpa, value }, path)
}

/// Records `entry` in `path` and checks its P flag.
fn present<E>(entry: Entry, path: &mut Path) -> Result<Entry, WalkError<E>> {
    path.push(entry);
    if entry.value & P == 0 {
        return Err(WalkError::NotPresent(entry));
    }
    Ok(entry)
}

/// Fails when `entry` has any of the bits `reserved` set.
fn check_reserved<E>(entry: Entry, reserved: u64) -> Result<(), WalkError<E>> {
    let bits = entry.value & reserved;
    if bits != 0 {
        return Err(WalkError::Reserved { entry, bits });
    }
    Ok(())
}

/// The guest-physical address in a page of `size` at `base` (an entry's
/// value, masked to its address bits) for `gva`.
fn in_page(base: u64, size: PageSize, gva: u64) -> u64 {
    (base & !size.offset_mask()) | (gva & size.offset_mask())
}

/// 32-bit paging (SDM 4.3): a page directory of 1024 4-byte PDEs at CR3
/// bits 31:12 indexed by gva bits 31:22; a PDE with PS = 1 maps a 4-MByte
/// page when CR4.PSE = 1 (PS is ignored otherwise), else points to a page
/// table of 1024 4-byte PTEs indexed by gva bits 21:12. No entry has an XD
/// bit, and only a 4-MByte PDE has reserved bits: bit 21, and bits
/// 20:(M-19) above its PSE-36 address bits when M = min(MAXPHYADDR, 40) is
/// below 40 (Table 4-4).
fn walk32<M: GuestMemory>(
    mem: &mut M,
    pse: bool,
    cr3: u64,
    gva: u64,
    m: u32,
) -> Result<Translation, WalkError<M::Error>> {
    const FRAME: u64 = 0xFFFF_F000;
    if gva > u64::from(u32::MAX) {
        return Err(WalkError::AboveFourGiB { gva });
    }
    let mut path = Path::EMPTY;
    let mut rights = Rights::ALL;

    let read = |mem: &mut M, level, gpa, path: &mut Path| {
        let value = mem
            .read_u32(gpa)
            .map(u64::from)
            .map_err(|error| WalkError::Memory { level, gpa, error })?;
        present(Entry { level, gpa, value }, path)
    };

    let pde_gpa = (cr3 & FRAME) | (((gva >> 22) & 0x3FF) << 2);
    let pde = read(mem, Level::Pd, pde_gpa, &mut path)?;
    if pse && pde.value & PS != 0 {
        // PSE-36: PDE bits (M-20):13 are physical-address bits (M-1):32.
        let m = m.min(40);
        check_reserved(pde, bits(21, 21) | bits(20, m.saturating_sub(19)))?;
        rights.add(pde.value, false);
        let high = (pde.value >> 13) & !u64::MAX.wrapping_shl(m.saturating_sub(32));
        let base = (pde.value & 0xFFC0_0000) | (high << 32);
        let size = PageSize::Size4MiB;
        return Ok(rights.finish(in_page(base, size, gva), size, path));
    }
    rights.add(pde.value, false);

    let pte_gpa = (pde.value & FRAME) | (((gva >> 12) & 0x3FF) << 2);
    let pte = read(mem, Level::Pt, pte_gpa, &mut path)?;
    rights.add(pte.value, false);
    let size = PageSize::Size4KiB;
    Ok(rights.finish(in_page(pte.value & FRAME, size, gva), size, path))
}

/// PAE paging (SDM 4.4): four 8-byte PDPTEs at CR3 bits 31:5 indexed by gva
/// bits 31:30, then 512-entry page directories and page tables of 8-byte
/// entries (as in 4-level paging, below the PDPT). A PDPTE has no R/W, U/S
/// or XD bit; its bits 2:1, 8:5 and 63:M are reserved (Table 4-8).
fn walk_pae<M: GuestMemory>(
    mem: &mut M,
    nxe: bool,
    cr3: u64,
    gva: u64,
    m: u32,
) -> Result<Translation, WalkError<M::Error>> {
    if gva > u64::from(u32::MAX) {
        return Err(WalkError::AboveFourGiB { gva });
    }
    let mut path = Path::EMPTY;
    let pdpte_gpa = (cr3 & 0xFFFF_FFE0) | (((gva >> 30) & 3) << 3);
    let pdpte = read_entry(mem, Level::Pdpt, pdpte_gpa, &mut path)?;
    check_reserved(pdpte, bits(2, 1) | bits(8, 5) | bits(63, m))?;
    let walk = Tables {
        nxe,
        gva,
        frame: frame(m),
        // Below the PDPT, bits 62:M are reserved (Tables 4-9 to 4-11), and
        // bit 63 unless it is XD.
        high: bits(62, m) | if nxe { 0 } else { XD },
    };
    walk.walk(mem, pdpte.value & walk.frame, &[Level::Pd], path)
}

/// 4-level and 5-level paging (SDM 4.5): 512-entry tables of 8-byte entries
/// from CR3 bits (M-1):12 (its other bits are flags, the PCID or LAM
/// controls, and ignored here), after the check that the address is
/// canonical (SDM 3.3.7.1).
fn walk_long<M: GuestMemory>(
    mem: &mut M,
    nxe: bool,
    cr3: u64,
    gva: u64,
    m: u32,
    five: bool,
) -> Result<Translation, WalkError<M::Error>> {
    let (width, canonical, upper): (u8, u64, &[Level]) = if five {
        let canonical = (((gva << 7) as i64) >> 7) as u64;
        (
            57,
            canonical,
            &[Level::Pml5, Level::Pml4, Level::Pdpt, Level::Pd],
        )
    } else {
        let canonical = (((gva << 16) as i64) >> 16) as u64;
        (48, canonical, &[Level::Pml4, Level::Pdpt, Level::Pd])
    };
    if canonical != gva {
        return Err(WalkError::NonCanonical { gva, width });
    }
    let walk = Tables {
        nxe,
        gva,
        frame: frame(m),
        // Bits 51:M are reserved in every entry (Tables 4-14 to 4-20), and
        // bit 63 unless it is XD; bits 62:52 are ignored (or protection
        // keys).
        high: bits(51, m) | if nxe { 0 } else { XD },
    };
    walk.walk(mem, cr3 & walk.frame, upper, Path::EMPTY)
}

/// The address bits (M-1):12 of a table or 4-KByte page in an entry.
const fn frame(m: u32) -> u64 {
    bits(m.saturating_sub(1), 12)
}

/// A walk through 512-entry tables of 8-byte entries (PAE below the PDPT,
/// 4- and 5-level paging).
struct Tables {
    nxe: bool,
    gva: u64,
    /// The address bits of an entry (M-1):12.
    frame: u64,
    /// The high bits reserved in every entry.
    high: u64,
}

impl Tables {
    /// Walks from the table at `table` through the levels `upper` and then
    /// a page table. PS = 1 is reserved in a PML5E or PML4E; it maps a
    /// 1-GByte page in a PDPTE (bits 29:13 then reserved, Table 4-16) and
    /// a 2-MByte page in a PDE (bits 20:13 then reserved, Tables 4-9 and
    /// 4-18); bit 7 of a PTE is PAT.
    fn walk<M: GuestMemory>(
        &self,
        mem: &mut M,
        mut table: u64,
        upper: &[Level],
        mut path: Path,
    ) -> Result<Translation, WalkError<M::Error>> {
        let mut rights = Rights::ALL;
        for &level in upper {
            let entry = read_entry(mem, level, self.index(table, level), &mut path)?;
            let large = entry.value & PS != 0;
            let (size, reserved) = match (level, large) {
                (Level::Pml5 | Level::Pml4, true) => (None, self.high | PS),
                (Level::Pdpt, true) => (Some(PageSize::Size1GiB), self.high | bits(29, 13)),
                (Level::Pd, true) => (Some(PageSize::Size2MiB), self.high | bits(20, 13)),
                _ => (None, self.high),
            };
            check_reserved(entry, reserved)?;
            rights.add(entry.value, self.nxe);
            if let Some(size) = size {
                let gpa = in_page(entry.value & self.frame, size, self.gva);
                return Ok(rights.finish(gpa, size, path));
            }
            table = entry.value & self.frame;
        }
        let pte = read_entry(mem, Level::Pt, self.index(table, Level::Pt), &mut path)?;
        check_reserved(pte, self.high)?;
        rights.add(pte.value, self.nxe);
        let size = PageSize::Size4KiB;
        Ok(rights.finish(in_page(pte.value & self.frame, size, self.gva), size, path))
    }

    /// The address of the entry for the gva in the table of `level` at
    /// `table` (4-KByte aligned: the index fills bits 11:3).
    fn index(&self, table: u64, level: Level) -> u64 {
        let shift = match level {
            Level::Pml5 => 48,
            Level::Pml4 => 39,
            Level::Pdpt => 30,
            Level::Pd => 21,
            Level::Pt => 12,
        };
        table | (((self.gva >> shift) & 0x1FF) << 3)
    }
}
