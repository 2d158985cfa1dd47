//! EPT: the tables that translate a guest's physical addresses to host
//! physical addresses, one set per view (view 0, the host p2m, and each
//! alternate view).
//!
//! Four levels of 512 entries (Intel SDM vol. 3, "EPT paging structures"): the
//! PML4 (level 4), PDPT (3), PD (2) and PT (1). Bits 2:0 of an entry are read,
//! write and execute; a leaf adds its memory type (5:3), ignore-PAT (6),
//! accessed (8) and dirty (9) and, at levels 3 and 2, the page-size bit (7)
//! that makes it a 1 GiB or 2 MiB page; bits 51:12 hold the address of the
//! next table or of the frames. Two rules go beyond the format:
//!
//! - **Empty is `1 << 63`, not 0.** Bit 63 is suppress-#VE. For a violation
//!   on a not-present entry the CPU looks at that entry's bit 63 and, where it
//!   is 0, delivers a #VE to the guest instead of exiting. So every new table
//!   is filled with [`bits::EMPTY`], unmapping writes it back, and a zero
//!   entry only exists where [`Ept::set_suppress_ve`] asked for one.
//! - **Bit 52 marks a mapping.** A page whose access is taken away entirely
//!   (R=W=X=0) is "not present" to the CPU, but it still maps its frames and
//!   must get them back when access returns. Every leaf this module writes
//!   carries [`bits::MAPPED`] (bits 62:52 are ignored by the CPU for EPT
//!   leaves, except 57, 58, 60 and 61 with features Parallax does not turn
//!   on), so a no-access page and an empty slot are told apart by this bit.
//!
//! Every change is one small step on one leaf or one walk (map, unmap,
//! protect, set suppress-#VE, split), so the kernel can put a capability
//! check in front of each, and a service can send them in batches
//! ([`EptOp`], [`Ept::apply_batch`]). Nothing here flushes: after changes
//! that remove or reduce access, split pages or clear accessed/dirty bits,
//! the caller runs INVEPT before relying on them, and before it reuses a
//! frame that was unmapped or a table that was freed (the CPU may still hold
//! a cached pointer to it).

/// Guest-physical addresses are 48 bits wide with a 4-level walk.
pub const GPA_LIMIT: u64 = 1 << 48;
/// Addresses in an entry are 52 bits wide at most (bits 51:12).
pub const HPA_LIMIT: u64 = 1 << 52;
/// Entries in one 4 KiB table.
pub const ENTRIES: usize = 512;

/// The bits of an EPT entry.
pub mod bits {
    pub const READ: u64 = 1 << 0;
    pub const WRITE: u64 = 1 << 1;
    pub const EXECUTE: u64 = 1 << 2;
    pub const RWX: u64 = READ | WRITE | EXECUTE;
    /// Memory type of a leaf, bits 5:3.
    pub const MEMORY_TYPE: u64 = 7 << 3;
    pub const IGNORE_PAT: u64 = 1 << 6;
    /// Page size: a leaf at level 3 (1 GiB) or 2 (2 MiB).
    pub const LARGE: u64 = 1 << 7;
    pub const ACCESSED: u64 = 1 << 8;
    pub const DIRTY: u64 = 1 << 9;
    /// Bits 51:12: the next table, or the frames of a leaf.
    pub const ADDRESS: u64 = 0x000f_ffff_ffff_f000;
    /// Software bit (ignored by the CPU): this leaf maps frames, even when its
    /// permissions are none.
    pub const MAPPED: u64 = 1 << 52;
    /// Software bit: a 4 KiB read-only leaf the owner armed to be made
    /// writable by the kernel on a write, which it records
    /// ([`super::Ept::lift`]). Any change of permissions disarms it.
    pub const LIFT: u64 = 1 << 53;
    /// Software bit: a read-only leaf (any size) of a VM fork that maps its
    /// parent's frames where the parent's entry was writable: the kernel
    /// copies the page into a frame of the fork's on a write
    /// ([`super::Ept::copy_armed`], docs/sharing.md). Any change of
    /// permissions or frame disarms it.
    pub const COPY: u64 = 1 << 54;
    /// The software bits a change of permissions or frame clears.
    pub const ARMED: u64 = LIFT | COPY;
    /// Suppress #VE: a violation on this entry exits to the hypervisor
    /// instead of raising #VE in the guest.
    pub const SUPPRESS_VE: u64 = 1 << 63;
    /// An entry that maps nothing and suppresses #VE.
    pub const EMPTY: u64 = SUPPRESS_VE;
}

use bits::*;

/// Where the tables live. The kernel's implementation hands out frames and
/// reaches them through its direct map; the tests' is a map of arrays.
pub trait TableMemory {
    /// A new 4 KiB table: its physical address (4 KiB aligned, below
    /// [`HPA_LIMIT`]), or `None` when out of memory. Its contents need not be
    /// initialised: [`Ept`] fills it with [`bits::EMPTY`] itself, so the
    /// suppress-#VE rule does not depend on every implementation.
    fn alloc_table(&mut self) -> Option<u64>;
    /// Takes back a table that no entry points to any more. The CPU may still
    /// have it cached until the next INVEPT; an implementation that reuses it
    /// at once must flush first.
    fn free_table(&mut self, table: u64);
    /// The 512 entries of the table at physical address `table`.
    fn entries(&self, table: u64) -> &[u64; ENTRIES];
    fn entries_mut(&mut self, table: u64) -> &mut [u64; ENTRIES];
    /// Clears `mask` in one entry and returns the entry as it was. The CPU
    /// sets accessed and dirty bits in live tables, so the kernel should do
    /// this with an atomic `fetch_and`; the default is a plain read and
    /// write, right for tables no CPU is using.
    fn clear_bits(&mut self, table: u64, slot: usize, mask: u64) -> u64 {
        let entry = &mut self.entries_mut(table)[slot % ENTRIES];
        let old = *entry;
        *entry = old & !mask;
        old
    }
}

/// The size of a leaf.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum PageSize {
    /// A PT entry.
    Size4K,
    /// A PD entry with the page-size bit ([`crate::vmx::VmxFeatures::ept_2m_pages`]).
    Size2M,
    /// A PDPT entry with the page-size bit ([`crate::vmx::VmxFeatures::ept_1g_pages`]).
    Size1G,
}

impl PageSize {
    pub const fn bytes(self) -> u64 {
        match self {
            Self::Size4K => 1 << 12,
            Self::Size2M => 1 << 21,
            Self::Size1G => 1 << 30,
        }
    }

    /// The level of the table that holds a leaf of this size (PT = 1).
    pub const fn level(self) -> u8 {
        match self {
            Self::Size4K => 1,
            Self::Size2M => 2,
            Self::Size1G => 3,
        }
    }

    /// The size of the pages a split leaf becomes; `None` for 4 KiB.
    pub const fn smaller(self) -> Option<Self> {
        match self {
            Self::Size4K => None,
            Self::Size2M => Some(Self::Size4K),
            Self::Size1G => Some(Self::Size2M),
        }
    }
}

/// Access rights of a leaf. Write without read is an EPT misconfiguration
/// and refused; execute-only is accepted here, and is for the caller to
/// offer only where [`crate::vmx::VmxFeatures::ept_execute_only`] says so.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Perms {
    pub read: bool,
    pub write: bool,
    pub execute: bool,
}

impl Perms {
    pub const NONE: Self = Self::new(false, false, false);
    pub const READ: Self = Self::new(true, false, false);
    pub const READ_WRITE: Self = Self::new(true, true, false);
    pub const READ_EXECUTE: Self = Self::new(true, false, true);
    pub const EXECUTE: Self = Self::new(false, false, true);
    pub const ALL: Self = Self::new(true, true, true);

    pub const fn new(read: bool, write: bool, execute: bool) -> Self {
        Self {
            read,
            write,
            execute,
        }
    }

    /// Bits 2:0 of an entry.
    pub const fn bits(self) -> u64 {
        (self.read as u64) | (self.write as u64) << 1 | (self.execute as u64) << 2
    }

    /// From bits 2:0 of an entry (other bits ignored).
    pub const fn from_bits(entry: u64) -> Self {
        Self::new(entry & READ != 0, entry & WRITE != 0, entry & EXECUTE != 0)
    }

    pub const fn is_none(self) -> bool {
        !(self.read || self.write || self.execute)
    }
}

/// The memory type of a leaf (bits 5:3). Only the five types EPT accepts can
/// be built; 2, 3 and 7 would be an EPT misconfiguration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct MemoryType(u8);

impl MemoryType {
    pub const UNCACHEABLE: Self = Self(0);
    pub const WRITE_COMBINING: Self = Self(1);
    pub const WRITE_THROUGH: Self = Self(4);
    pub const WRITE_PROTECTED: Self = Self(5);
    pub const WRITE_BACK: Self = Self(6);

    /// The type with this encoding, if EPT allows it.
    pub const fn new(bits: u8) -> Option<Self> {
        match bits {
            0 | 1 | 4 | 5 | 6 => Some(Self(bits)),
            _ => None,
        }
    }

    pub const fn bits(self) -> u8 {
        self.0
    }
}

/// One leaf: a page of 4 KiB, 2 MiB or 1 GiB and how the guest may use it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Mapping {
    /// Guest-physical address of the page's first byte.
    pub gpa: u64,
    /// Host-physical address of the page's first byte.
    pub hpa: u64,
    pub size: PageSize,
    /// [`Perms::NONE`] for a page whose access was taken away: it still maps
    /// its frames.
    pub perms: Perms,
    pub memory_type: MemoryType,
    /// Set by the CPU (with EPT A/D on) since last cleared.
    pub accessed: bool,
    pub dirty: bool,
    /// A violation on this page exits instead of raising #VE in the guest.
    pub suppress_ve: bool,
}

impl Mapping {
    /// The host-physical address of the byte at `gpa`, if it is in this page.
    pub const fn hpa_of(&self, gpa: u64) -> Option<u64> {
        if gpa >= self.gpa && gpa - self.gpa < self.size.bytes() {
            Some(self.hpa + (gpa - self.gpa))
        } else {
            None
        }
    }
}

/// The entry that ends the walk for an address: a leaf, or the first empty
/// entry on the way down. For diagnostics (an EPT violation's report).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct RawEntry {
    /// 4 for the PML4 down to 1 for a PT.
    pub level: u8,
    /// Physical address of the table that holds it, and its index there.
    pub table: u64,
    pub slot: usize,
    pub value: u64,
}

/// Why a change was refused. A refused change leaves the tables as they were.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum EptError {
    /// The guest-physical address is at or above [`GPA_LIMIT`].
    OutOfRange { gpa: u64 },
    /// The frames would reach beyond what an entry can hold ([`HPA_LIMIT`]).
    HpaOutOfRange { hpa: u64 },
    /// `gpa` or `hpa` is not aligned to the page size.
    Misaligned { gpa: u64, hpa: u64, size: PageSize },
    /// A page at `existing` of `size` already maps part of what `gpa` asked
    /// for (the same slot, a large page around it, or smaller pages under it).
    AlreadyMapped {
        gpa: u64,
        existing: u64,
        size: PageSize,
    },
    /// No page maps `gpa`.
    NotMapped { gpa: u64 },
    /// Split asked of a 4 KiB page.
    NotLarge { gpa: u64 },
    /// Write without read: the CPU would take it as a misconfiguration.
    WriteWithoutRead { gpa: u64 },
    /// A table could not be allocated.
    OutOfMemory,
}

/// One change, for batches ([`Ept::apply_batch`]). Each is independent: the
/// kernel checks the caller's rights for each before applying it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum EptOp {
    Map {
        gpa: u64,
        hpa: u64,
        size: PageSize,
        perms: Perms,
        memory_type: MemoryType,
    },
    Unmap {
        gpa: u64,
    },
    Protect {
        gpa: u64,
        perms: Perms,
    },
    SetSuppressVe {
        gpa: u64,
        suppress: bool,
    },
    Split {
        gpa: u64,
    },
}

/// One set of EPT tables, known by its PML4.
///
/// Invariants kept by every operation: every table but the PML4 holds at
/// least one entry other than [`bits::EMPTY`] (tables left with nothing are
/// freed), every leaf carries [`bits::MAPPED`], and a refused operation
/// changes nothing.
#[derive(Debug, PartialEq, Eq)]
pub struct Ept {
    root: u64,
}

impl Ept {
    /// An EPT that maps nothing.
    pub fn new<M: TableMemory + ?Sized>(mem: &mut M) -> Result<Self, EptError> {
        Ok(Self {
            root: new_table(mem)?,
        })
    }

    /// Physical address of the PML4.
    pub const fn root(&self) -> u64 {
        self.root
    }

    /// The EPT pointer for the VMCS or the VMFUNC list: write-back walks,
    /// 4 levels, accessed/dirty flags where asked (and where
    /// [`crate::vmx::VmxFeatures::ept_ad`] allows).
    pub const fn eptp(&self, accessed_dirty: bool) -> u64 {
        const WRITE_BACK: u64 = 6;
        const WALK_LENGTH_4: u64 = (4 - 1) << 3;
        self.root | WRITE_BACK | WALK_LENGTH_4 | (accessed_dirty as u64) << 6
    }

    /// Maps `size` bytes at `gpa` to the frames at `hpa`. The new leaf
    /// suppresses #VE (clear it with [`Self::set_suppress_ve`]), has
    /// ignore-PAT clear and accessed/dirty clear.
    ///
    /// Never overwrites: a page already mapping any of the range (the same
    /// slot, a larger page around it, smaller pages under it) is
    /// [`EptError::AlreadyMapped`]. A table under the slot that maps nothing
    /// (it holds only empty slots with suppress-#VE cleared) is replaced.
    pub fn map<M: TableMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        gpa: u64,
        hpa: u64,
        size: PageSize,
        perms: Perms,
        memory_type: MemoryType,
    ) -> Result<(), EptError> {
        self.map_bits(mem, gpa, hpa, size, perms, memory_type, 0)
    }

    /// [`Ept::map`] for a VM fork's page of its parent's: read-only, and
    /// armed for copy on write ([`bits::COPY`]) where `perms` (the
    /// parent's) has write.
    pub fn map_for_fork<M: TableMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        gpa: u64,
        hpa: u64,
        size: PageSize,
        perms: Perms,
        memory_type: MemoryType,
    ) -> Result<(), EptError> {
        let copy = if perms.write && perms.read { COPY } else { 0 };
        let read_only = Perms::new(perms.read, false, perms.execute);
        self.map_bits(mem, gpa, hpa, size, read_only, memory_type, copy)
    }

    #[allow(clippy::too_many_arguments)]
    fn map_bits<M: TableMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        gpa: u64,
        hpa: u64,
        size: PageSize,
        perms: Perms,
        memory_type: MemoryType,
        extra: u64,
    ) -> Result<(), EptError> {
        check_gpa(gpa)?;
        let bytes = size.bytes();
        if !gpa.is_multiple_of(bytes) || !hpa.is_multiple_of(bytes) {
            return Err(EptError::Misaligned { gpa, hpa, size });
        }
        if hpa > HPA_LIMIT - bytes {
            return Err(EptError::HpaOutOfRange { hpa });
        }
        check_perms(gpa, perms)?;
        let level = size.level();
        let table = self.path_to(mem, gpa, level)?;
        let slot = slot(gpa, level);
        let leaf = hpa | perms.bits() | (memory_type.0 as u64) << 3 | MAPPED | SUPPRESS_VE | extra;
        let leaf = if size == PageSize::Size4K {
            leaf
        } else {
            leaf | LARGE
        };
        match kind(read(mem, table, slot), level) {
            Kind::Leaf(existing) => Err(EptError::AlreadyMapped {
                gpa,
                existing: gpa & !(existing.bytes() - 1),
                size: existing,
            }),
            Kind::Table(below) => {
                if let Some((existing, size)) = first_leaf(mem, below, level - 1, gpa) {
                    return Err(EptError::AlreadyMapped {
                        gpa,
                        existing,
                        size,
                    });
                }
                // Point away from the old tables before freeing them.
                write(mem, table, slot, leaf);
                free_tree(mem, below, level - 1);
                Ok(())
            }
            Kind::Empty => {
                write(mem, table, slot, leaf);
                Ok(())
            }
        }
    }

    /// Removes the leaf (of any size) that maps `gpa`, returns what it
    /// mapped, and leaves an empty entry ([`bits::EMPTY`]: suppress-#VE set).
    /// Tables left holding nothing are freed.
    pub fn unmap<M: TableMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        gpa: u64,
    ) -> Result<Mapping, EptError> {
        check_gpa(gpa)?;
        let walk = self.walk(mem, gpa);
        let Kind::Leaf(size) = walk.kind() else {
            return Err(EptError::NotMapped { gpa });
        };
        write(mem, walk.table(), walk.slot, EMPTY);
        prune(mem, gpa, &walk);
        Ok(decode(walk.entry, size, gpa))
    }

    /// The leaf that maps `gpa`, whatever its permissions (a no-access page
    /// is returned with [`Perms::NONE`]); `None` where nothing maps it.
    pub fn query<M: TableMemory + ?Sized>(&self, mem: &M, gpa: u64) -> Option<Mapping> {
        if gpa >= GPA_LIMIT {
            return None;
        }
        let walk = self.walk(mem, gpa);
        match walk.kind() {
            Kind::Leaf(size) => Some(decode(walk.entry, size, gpa)),
            _ => None,
        }
    }

    /// The host-physical address the guest reaches at `gpa`: `None` where
    /// nothing maps it and where the page allows no access at all (use
    /// [`Self::query`] for the frames of such a page).
    pub fn translate<M: TableMemory + ?Sized>(&self, mem: &M, gpa: u64) -> Option<u64> {
        self.query(mem, gpa)
            .filter(|m| !m.perms.is_none())
            .and_then(|m| m.hpa_of(gpa))
    }

    /// The entry that ends the walk for `gpa`: its leaf, or the first empty
    /// entry on the way down.
    pub fn raw_entry<M: TableMemory + ?Sized>(
        &self,
        mem: &M,
        gpa: u64,
    ) -> Result<RawEntry, EptError> {
        check_gpa(gpa)?;
        let walk = self.walk(mem, gpa);
        Ok(RawEntry {
            level: walk.level,
            table: walk.table(),
            slot: walk.slot,
            value: walk.entry,
        })
    }

    /// Sets the permissions of the leaf that maps `gpa` (all of it, for a
    /// large page) and returns the leaf as it was. Frames, memory type,
    /// suppress-#VE and accessed/dirty stay.
    pub fn protect<M: TableMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        gpa: u64,
        perms: Perms,
    ) -> Result<Mapping, EptError> {
        check_gpa(gpa)?;
        check_perms(gpa, perms)?;
        let walk = self.walk(mem, gpa);
        let Kind::Leaf(size) = walk.kind() else {
            return Err(EptError::NotMapped { gpa });
        };
        write(
            mem,
            walk.table(),
            walk.slot,
            (walk.entry & !(RWX | ARMED)) | perms.bits(),
        );
        Ok(decode(walk.entry, size, gpa))
    }

    /// Points the 4 KiB leaf that maps `gpa` at frame `hpa` with `perms`,
    /// in place (no table is allocated or freed), and returns the leaf as it
    /// was. Memory type and suppress-#VE stay; accessed, dirty and the
    /// armed bit are cleared. A large leaf is [`EptError::NotLarge`]'s
    /// opposite: split it first (`Misaligned` is returned for it). Used to
    /// change which frame backs a page (page sharing, docs/sharing.md).
    pub fn replace<M: TableMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        gpa: u64,
        hpa: u64,
        perms: Perms,
    ) -> Result<Mapping, EptError> {
        check_gpa(gpa)?;
        check_perms(gpa, perms)?;
        if !hpa.is_multiple_of(PageSize::Size4K.bytes()) || hpa >= HPA_LIMIT {
            return Err(EptError::HpaOutOfRange { hpa });
        }
        let walk = self.walk(mem, gpa);
        match walk.kind() {
            Kind::Leaf(PageSize::Size4K) => {
                let keep = walk.entry & !(ADDRESS | RWX | ARMED | ACCESSED | DIRTY);
                write(mem, walk.table(), walk.slot, keep | hpa | perms.bits());
                Ok(decode(walk.entry, PageSize::Size4K, gpa))
            }
            Kind::Leaf(size) => Err(EptError::Misaligned { gpa, hpa, size }),
            _ => Err(EptError::NotMapped { gpa }),
        }
    }

    /// Sets or clears suppress-#VE for `gpa`: on the leaf that maps it (all
    /// of it, for a large page), or, where nothing maps it, on the empty
    /// 4 KiB entry for it, since the CPU reads bit 63 of not-present entries
    /// too. Clearing it there builds the tables down to that entry (the slot
    /// still maps nothing); setting it back frees them when they hold nothing
    /// else.
    pub fn set_suppress_ve<M: TableMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        gpa: u64,
        suppress: bool,
    ) -> Result<(), EptError> {
        check_gpa(gpa)?;
        let walk = self.walk(mem, gpa);
        match walk.kind() {
            Kind::Leaf(_) if suppress => {
                write(mem, walk.table(), walk.slot, walk.entry | SUPPRESS_VE)
            }
            Kind::Leaf(_) => write(mem, walk.table(), walk.slot, walk.entry & !SUPPRESS_VE),
            _ if suppress => {
                if walk.entry & SUPPRESS_VE == 0 {
                    write(mem, walk.table(), walk.slot, walk.entry | SUPPRESS_VE);
                    prune(mem, gpa, &walk);
                }
            }
            _ => {
                let table = self.path_to(mem, gpa, 1)?;
                let slot = slot(gpa, 1);
                let entry = read(mem, table, slot);
                write(mem, table, slot, entry & !SUPPRESS_VE);
            }
        }
        Ok(())
    }

    /// Arms every 4 KiB leaf among `[start, end)` that can be read and not
    /// written to be lifted on a write ([`bits::LIFT`]); large leaves and
    /// others are left as they are.
    pub fn arm_lift<M: TableMemory + ?Sized>(&mut self, mem: &mut M, start: u64, end: u64) {
        let _ = self.leaves_mut(mem, start, end, |mem, table, slot, _gpa, size, entry| {
            if size == PageSize::Size4K && entry & (READ | WRITE) == READ {
                write(mem, table, slot, entry | LIFT);
            }
            Ok(None)
        });
    }

    /// Arms the leaf that maps `gpa` (all of it, for a large page) for a
    /// VM fork's copy on write ([`bits::COPY`]) if it can be read and not
    /// written. Returns whether it is armed.
    pub fn arm_copy<M: TableMemory + ?Sized>(&mut self, mem: &mut M, gpa: u64) -> bool {
        if check_gpa(gpa).is_err() {
            return false;
        }
        let walk = self.walk(mem, gpa);
        match walk.kind() {
            Kind::Leaf(_) if walk.entry & (READ | WRITE) == READ => {
                write(mem, walk.table(), walk.slot, walk.entry | COPY);
                true
            }
            _ => false,
        }
    }

    /// The leaf that maps `gpa` if it is armed for copy on write
    /// ([`bits::COPY`]).
    pub fn copy_armed<M: TableMemory + ?Sized>(&self, mem: &M, gpa: u64) -> Option<Mapping> {
        check_gpa(gpa).ok()?;
        let walk = self.walk(mem, gpa);
        match walk.kind() {
            Kind::Leaf(size) if walk.entry & COPY != 0 => Some(decode(walk.entry, size, gpa)),
            _ => None,
        }
    }

    /// A write fault on `gpa`: if its leaf is an armed 4 KiB one
    /// ([`bits::LIFT`]), makes it writable (and accessed and dirty, so that
    /// PML does not log this write as well), disarms it, and returns the
    /// frame's address. The CPU drops its cached translation of a faulting
    /// address itself.
    pub fn lift<M: TableMemory + ?Sized>(&mut self, mem: &mut M, gpa: u64) -> Option<u64> {
        check_gpa(gpa).ok()?;
        let walk = self.walk(mem, gpa);
        match walk.kind() {
            Kind::Leaf(PageSize::Size4K) if walk.entry & LIFT != 0 => {
                let entry = (walk.entry & !LIFT) | WRITE | ACCESSED | DIRTY;
                write(mem, walk.table(), walk.slot, entry);
                Some(walk.entry & ADDRESS)
            }
            _ => None,
        }
    }

    /// Sets the accessed and dirty bits of the leaf that maps `gpa` (a write
    /// through it then sets no bit, and PML logs nothing). `NotMapped` if
    /// nothing maps it.
    pub fn set_dirty<M: TableMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        gpa: u64,
    ) -> Result<(), EptError> {
        check_gpa(gpa)?;
        let walk = self.walk(mem, gpa);
        match walk.kind() {
            Kind::Leaf(_) => {
                write(mem, walk.table(), walk.slot, walk.entry | ACCESSED | DIRTY);
                Ok(())
            }
            _ => Err(EptError::NotMapped { gpa }),
        }
    }

    /// Replaces the large leaf that maps `gpa` with a table of 512 leaves of
    /// the next smaller size (1 GiB into 2 MiB, 2 MiB into 4 KiB) mapping the
    /// same frames with the same permissions, memory type, ignore-PAT,
    /// suppress-#VE and accessed/dirty bits. A 4 KiB leaf is
    /// [`EptError::NotLarge`]. Translations do not change, so the CPU may use
    /// the old leaf or the new table until the next INVEPT.
    pub fn split<M: TableMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        gpa: u64,
    ) -> Result<(), EptError> {
        check_gpa(gpa)?;
        let walk = self.walk(mem, gpa);
        let Kind::Leaf(size) = walk.kind() else {
            return Err(EptError::NotMapped { gpa });
        };
        let Some(smaller) = size.smaller() else {
            return Err(EptError::NotLarge { gpa });
        };
        let table = split_leaf(mem, walk.entry, size, smaller)?;
        write(mem, walk.table(), walk.slot, table_entry(table));
        Ok(())
    }

    /// Splits every large leaf that overlaps `[start, end)` until the range
    /// is mapped with 4 KiB leaves (a leaf that straddles an end is split
    /// whole). On [`EptError::OutOfMemory`] the splits done so far stay;
    /// translations are the same either way.
    pub fn split_to_4k<M: TableMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        start: u64,
        end: u64,
    ) -> Result<(), EptError> {
        self.leaves_mut(mem, start, end, |mem, table, slot, _, size, entry| {
            let Some(smaller) = size.smaller() else {
                return Ok(None);
            };
            let new = split_leaf(mem, entry, size, smaller)?;
            write(mem, table, slot, table_entry(new));
            Ok(Some(new))
        })
    }

    /// Sets the permissions of every page mapped in `[start, end)`, leaving
    /// unmapped ones unmapped: a large leaf inside the range is rewritten
    /// whole (one entry), one that straddles an end is split and only its
    /// pages inside the range change. The work is in proportion to the
    /// leaves touched, not to the pages: 1 GiB mapped with 2 MiB pages is
    /// 512 entry writes. Frames, memory type and suppress-#VE stay.
    pub fn protect_range<M: TableMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        start: u64,
        end: u64,
        perms: Perms,
    ) -> Result<(), EptError> {
        check_perms(start, perms)?;
        if end > GPA_LIMIT || start > end {
            return Err(EptError::OutOfRange { gpa: end });
        }
        self.leaves_mut(mem, start, end, |mem, table, slot, gpa, size, entry| {
            if gpa >= start && gpa + size.bytes() <= end {
                write(mem, table, slot, (entry & !(RWX | ARMED)) | perms.bits());
                return Ok(None);
            }
            // Straddles an end: split it, and go on in the new table.
            let Some(smaller) = size.smaller() else {
                return Ok(None);
            };
            let new = split_leaf(mem, entry, size, smaller)?;
            write(mem, table, slot, table_entry(new));
            Ok(Some(new))
        })
    }

    /// Reads and clears the accessed and dirty bits of every leaf that
    /// overlaps `[start, end)`, and calls `f(gpa, size, accessed, dirty)`
    /// once for each leaf that had either set, in address order. Empty
    /// subtrees are skipped and a large leaf is one step. The CPU keeps using
    /// cached translations without setting the bits again until the caller
    /// runs INVEPT.
    pub fn take_accessed_dirty<M, F>(&mut self, mem: &mut M, start: u64, end: u64, mut f: F)
    where
        M: TableMemory + ?Sized,
        F: FnMut(u64, PageSize, bool, bool),
    {
        let _ = self.leaves_mut(mem, start, end, |mem, table, slot, gpa, size, entry| {
            if entry & (ACCESSED | DIRTY) != 0 {
                let old = mem.clear_bits(table, slot, ACCESSED | DIRTY);
                let (accessed, dirty) = (old & ACCESSED != 0, old & DIRTY != 0);
                if accessed || dirty {
                    f(gpa, size, accessed, dirty);
                }
            }
            Ok(None)
        });
    }

    /// Calls `f` for every leaf that overlaps `[start, end)`, in address
    /// order, skipping empty subtrees.
    pub fn for_each_leaf<M, F>(&self, mem: &M, start: u64, end: u64, mut f: F)
    where
        M: TableMemory + ?Sized,
        F: FnMut(&Mapping),
    {
        walk_range(mem, self.root, 4, 0, start, end, &mut |gpa, size, entry| {
            f(&decode(entry, size, gpa))
        });
    }

    /// Applies one change; see the method of the same name for each.
    pub fn apply<M: TableMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        op: &EptOp,
    ) -> Result<(), EptError> {
        match *op {
            EptOp::Map {
                gpa,
                hpa,
                size,
                perms,
                memory_type,
            } => self.map(mem, gpa, hpa, size, perms, memory_type),
            EptOp::Unmap { gpa } => self.unmap(mem, gpa).map(|_| ()),
            EptOp::Protect { gpa, perms } => self.protect(mem, gpa, perms).map(|_| ()),
            EptOp::SetSuppressVe { gpa, suppress } => self.set_suppress_ve(mem, gpa, suppress),
            EptOp::Split { gpa } => self.split(mem, gpa),
        }
    }

    /// Applies `ops` in order, each on its own: a refused op is recorded in
    /// `results` and the next one goes on. Returns how many were applied
    /// (the shorter of the two slices).
    pub fn apply_batch<M: TableMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        ops: &[EptOp],
        results: &mut [Result<(), EptError>],
    ) -> usize {
        let mut done = 0;
        for (op, result) in ops.iter().zip(results.iter_mut()) {
            *result = self.apply(mem, op);
            done += 1;
        }
        done
    }

    /// Makes these tables a copy of `host`'s, entry for entry (leaves of
    /// every size, their permissions, suppress-#VE, accessed/dirty and
    /// software bits), in new tables from `mem`, and frees the old ones.
    /// The PML4 stays (so does the EPT pointer). On
    /// [`EptError::OutOfMemory`] nothing changed.
    pub fn copy_from<M: TableMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        host: &Ept,
    ) -> Result<(), EptError> {
        let copy = copy_tree(mem, host.root, 4)?;
        for slot in 0..ENTRIES {
            let old = read(mem, self.root, slot);
            write(mem, self.root, slot, read(mem, copy, slot));
            if let Kind::Table(next) = kind(old, 4) {
                free_tree(mem, next, 3);
            }
        }
        mem.free_table(copy);
        Ok(())
    }

    /// Frees every table, the PML4 last. The mapped frames are the caller's.
    pub fn destroy<M: TableMemory + ?Sized>(self, mem: &mut M) {
        free_tree(mem, self.root, 4);
    }

    /// [`walk_range_mut`] over every table, from the PML4.
    fn leaves_mut<M, F>(&self, mem: &mut M, start: u64, end: u64, mut f: F) -> Result<(), EptError>
    where
        M: TableMemory + ?Sized,
        F: FnMut(&mut M, u64, usize, u64, PageSize, u64) -> Result<Option<u64>, EptError>,
    {
        walk_range_mut(mem, self.root, 4, 0, start, end, &mut f)
    }

    /// Follows `gpa` down to its leaf or to the first empty entry.
    fn walk<M: TableMemory + ?Sized>(&self, mem: &M, gpa: u64) -> Walk {
        let mut tables = [0; 5];
        let mut table = self.root;
        let mut level = 4;
        loop {
            tables[level as usize] = table;
            let slot = slot(gpa, level);
            let entry = read(mem, table, slot);
            match kind(entry, level) {
                Kind::Table(next) if level > 1 => {
                    table = next;
                    level -= 1;
                }
                _ => {
                    return Walk {
                        tables,
                        level,
                        slot,
                        entry,
                    };
                }
            }
        }
    }

    /// The table at `target` level on the way to `gpa`, building the missing
    /// ones. A leaf on the way is [`EptError::AlreadyMapped`]; on
    /// [`EptError::OutOfMemory`] the tables built here are freed again.
    fn path_to<M: TableMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        gpa: u64,
        target: u8,
    ) -> Result<u64, EptError> {
        // The first entry changed (table, slot, old value) and the table put
        // there, to undo on failure: everything built hangs below it.
        let mut built: Option<(u64, usize, u64, u64, u8)> = None;
        let mut table = self.root;
        let mut level = 4;
        while level > target {
            let slot = slot(gpa, level);
            let entry = read(mem, table, slot);
            table = match kind(entry, level) {
                Kind::Table(next) => next,
                Kind::Leaf(size) => {
                    undo(mem, built);
                    return Err(EptError::AlreadyMapped {
                        gpa,
                        existing: gpa & !(size.bytes() - 1),
                        size,
                    });
                }
                Kind::Empty => match new_table(mem) {
                    Ok(new) => {
                        write(mem, table, slot, table_entry(new));
                        built.get_or_insert((table, slot, entry, new, level - 1));
                        new
                    }
                    Err(e) => {
                        undo(mem, built);
                        return Err(e);
                    }
                },
            };
            level -= 1;
        }
        Ok(table)
    }
}

/// What an entry is, read at its level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Maps nothing (whatever its suppress-#VE bit).
    Empty,
    /// Points to the next table.
    Table(u64),
    /// Maps a page: some permission set, or the software mapped bit.
    Leaf(PageSize),
}

fn kind(entry: u64, level: u8) -> Kind {
    let present = entry & RWX != 0;
    let leaf = present || entry & MAPPED != 0;
    match level {
        1 if leaf => Kind::Leaf(PageSize::Size4K),
        2 if leaf && entry & LARGE != 0 => Kind::Leaf(PageSize::Size2M),
        3 if leaf && entry & LARGE != 0 => Kind::Leaf(PageSize::Size1G),
        2..=4 if present && entry & LARGE == 0 => Kind::Table(entry & ADDRESS),
        _ => Kind::Empty,
    }
}

/// Where a walk ended.
struct Walk {
    /// `tables[l]` is the table at level `l`, for `level..=4`.
    tables: [u64; 5],
    level: u8,
    slot: usize,
    entry: u64,
}

impl Walk {
    #[inline]
    fn kind(&self) -> Kind {
        kind(self.entry, self.level)
    }

    /// The table holding the entry the walk ended on.
    fn table(&self) -> u64 {
        self.tables[self.level as usize]
    }
}

/// Bytes one entry covers at `level` (4 KiB at level 1, 512 GiB at 4).
const fn span(level: u8) -> u64 {
    1 << (3 + 9 * level as u32)
}

/// Index of `gpa`'s entry in its table at `level`.
const fn slot(gpa: u64, level: u8) -> usize {
    ((gpa >> (3 + 9 * level as u32)) % ENTRIES as u64) as usize
}

fn read<M: TableMemory + ?Sized>(mem: &M, table: u64, slot: usize) -> u64 {
    mem.entries(table)[slot % ENTRIES]
}

fn write<M: TableMemory + ?Sized>(mem: &mut M, table: u64, slot: usize, value: u64) {
    mem.entries_mut(table)[slot % ENTRIES] = value;
}

fn check_gpa(gpa: u64) -> Result<(), EptError> {
    if gpa < GPA_LIMIT {
        Ok(())
    } else {
        Err(EptError::OutOfRange { gpa })
    }
}

fn check_perms(gpa: u64, perms: Perms) -> Result<(), EptError> {
    if perms.write && !perms.read {
        Err(EptError::WriteWithoutRead { gpa })
    } else {
        Ok(())
    }
}

/// A non-leaf entry: all rights (the leaf decides), memory type 0, bit 63 0.
const fn table_entry(table: u64) -> u64 {
    (table & ADDRESS) | RWX
}

fn decode(entry: u64, size: PageSize, gpa: u64) -> Mapping {
    let offset = size.bytes() - 1;
    Mapping {
        gpa: gpa & !offset,
        hpa: entry & ADDRESS & !offset,
        size,
        perms: Perms::from_bits(entry),
        memory_type: MemoryType(((entry & MEMORY_TYPE) >> 3) as u8),
        accessed: entry & ACCESSED != 0,
        dirty: entry & DIRTY != 0,
        suppress_ve: entry & SUPPRESS_VE != 0,
    }
}

/// A new table of empty entries.
fn new_table<M: TableMemory + ?Sized>(mem: &mut M) -> Result<u64, EptError> {
    let table = mem.alloc_table().ok_or(EptError::OutOfMemory)?;
    mem.entries_mut(table).fill(EMPTY);
    Ok(table)
}

/// A table of 512 leaves of `smaller` size covering the leaf `entry`.
fn split_leaf<M: TableMemory + ?Sized>(
    mem: &mut M,
    entry: u64,
    size: PageSize,
    smaller: PageSize,
) -> Result<u64, EptError> {
    let table = mem.alloc_table().ok_or(EptError::OutOfMemory)?;
    let base = entry & ADDRESS & !(size.bytes() - 1);
    let mut flags = entry & !ADDRESS;
    if smaller == PageSize::Size4K {
        flags &= !LARGE;
    }
    for (i, e) in mem.entries_mut(table).iter_mut().enumerate() {
        *e = flags | ((base + i as u64 * smaller.bytes()) & ADDRESS);
    }
    Ok(table)
}

/// Takes back the tables [`Ept::path_to`] built before it failed.
fn undo<M: TableMemory + ?Sized>(mem: &mut M, built: Option<(u64, usize, u64, u64, u8)>) {
    if let Some((table, slot, old, new, level)) = built {
        write(mem, table, slot, old);
        free_tree(mem, new, level);
    }
}

/// Frees the tables that hold nothing, from the end of `walk` upwards,
/// stopping at the first that holds something (and always at the PML4).
fn prune<M: TableMemory + ?Sized>(mem: &mut M, gpa: u64, walk: &Walk) {
    let mut level = walk.level;
    while level < 4 {
        let table = walk.tables[level as usize];
        if mem.entries(table).iter().any(|&e| e != EMPTY) {
            return;
        }
        write(
            mem,
            walk.tables[level as usize + 1],
            slot(gpa, level + 1),
            EMPTY,
        );
        mem.free_table(table);
        level += 1;
    }
}

/// A copy of `table` (at `level`) and every table below it.
fn copy_tree<M: TableMemory + ?Sized>(mem: &mut M, table: u64, level: u8) -> Result<u64, EptError> {
    let new = mem.alloc_table().ok_or(EptError::OutOfMemory)?;
    for slot in 0..ENTRIES {
        let entry = read(mem, table, slot);
        let value = match kind(entry, level) {
            Kind::Table(next) if level > 1 => match copy_tree(mem, next, level - 1) {
                Ok(copy) => (entry & !ADDRESS) | copy,
                Err(e) => {
                    // Only what is copied so far hangs below `new`.
                    mem.entries_mut(new)[slot..].fill(EMPTY);
                    free_tree(mem, new, level);
                    return Err(e);
                }
            },
            _ => entry,
        };
        write(mem, new, slot, value);
    }
    Ok(new)
}

/// Frees `table` (at `level`) and every table below it.
fn free_tree<M: TableMemory + ?Sized>(mem: &mut M, table: u64, level: u8) {
    if level > 1 {
        for slot in 0..ENTRIES {
            if let Kind::Table(next) = kind(read(mem, table, slot), level) {
                free_tree(mem, next, level - 1);
            }
        }
    }
    mem.free_table(table);
}

/// The lowest leaf under `table` (at `level`, covering from `base`).
fn first_leaf<M: TableMemory + ?Sized>(
    mem: &M,
    table: u64,
    level: u8,
    base: u64,
) -> Option<(u64, PageSize)> {
    for (slot, &entry) in mem.entries(table).iter().enumerate() {
        let at = base + slot as u64 * span(level);
        match kind(entry, level) {
            Kind::Leaf(size) => return Some((at, size)),
            Kind::Table(next) if level > 1 => {
                if let Some(found) = first_leaf(mem, next, level - 1, at) {
                    return Some(found);
                }
            }
            _ => {}
        }
    }
    None
}

/// The slots of a table at `level` covering from `base` that overlap
/// `[start, end)`.
fn slots(base: u64, level: u8, start: u64, end: u64) -> core::ops::Range<usize> {
    let span = span(level);
    let lo = start.max(base);
    let hi = end.min(base.saturating_add(span * ENTRIES as u64));
    if lo >= hi {
        return 0..0;
    }
    ((lo - base) / span) as usize..((hi - 1 - base) / span) as usize + 1
}

/// Calls `f(gpa, size, entry)` for every leaf under `table` that overlaps
/// `[start, end)`, in address order.
fn walk_range<M, F>(mem: &M, table: u64, level: u8, base: u64, start: u64, end: u64, f: &mut F)
where
    M: TableMemory + ?Sized,
    F: FnMut(u64, PageSize, u64),
{
    // One borrow of the table for all its slots: the walk reads each table once.
    let entries = mem.entries(table);
    for slot in slots(base, level, start, end) {
        let at = base + slot as u64 * span(level);
        let Some(&entry) = entries.get(slot) else {
            return;
        };
        match kind(entry, level) {
            Kind::Leaf(size) => f(at, size, entry),
            Kind::Table(next) if level > 1 => walk_range(mem, next, level - 1, at, start, end, f),
            _ => {}
        }
    }
}

/// [`walk_range`] that may change the tables: `f(mem, table, slot, gpa,
/// size, entry)` is called for each leaf and may replace it with a new table
/// (returning it), which is then walked too. Stops at the first error.
fn walk_range_mut<M, F>(
    mem: &mut M,
    table: u64,
    level: u8,
    base: u64,
    start: u64,
    end: u64,
    f: &mut F,
) -> Result<(), EptError>
where
    M: TableMemory + ?Sized,
    F: FnMut(&mut M, u64, usize, u64, PageSize, u64) -> Result<Option<u64>, EptError>,
{
    for slot in slots(base, level, start, end) {
        let at = base + slot as u64 * span(level);
        let entry = read(mem, table, slot);
        let below = match kind(entry, level) {
            Kind::Leaf(size) => f(mem, table, slot, at, size, entry)?,
            Kind::Table(next) => Some(next),
            Kind::Empty => None,
        };
        if let Some(next) = below
            && level > 1
        {
            walk_range_mut(mem, next, level - 1, at, start, end, f)?;
        }
    }
    Ok(())
}

#[cfg(any(test, feature = "std"))]
pub mod host;
#[cfg(test)]
mod tests;
