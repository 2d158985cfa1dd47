//! What the boot loader handed over, read once from the multiboot2
//! information: the command line, the memory map, the boot modules (each
//! named by its module command line), the ACPI root pointer.

use crate::mem::phys_to_virt;
use multiboot2::{BootInformation, BootInformationHeader, MemoryAreaType};
use platform::memory::Region;

/// The multiboot2 magic in EAX at entry.
pub const MULTIBOOT2_MAGIC: u32 = 0x36d7_6289;
/// The boot information, kept for the kernel's lifetime.
static MBI: spin::Once<BootInformation<'static>> = spin::Once::new();

/// The most boot modules an image may carry.
pub const MAX_MODULES: usize = 32;

/// One boot module: a file GRUB loaded, with the name from its command line.
#[derive(Clone, Copy, Debug)]
pub struct Module {
    pub name: &'static str,
    pub region: Region,
}

/// Which multiboot2 tag the RSDP came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, defmt::Format)]
pub enum RsdpSource {
    /// Tag 15: ACPI 2.0+ (XSDT).
    New,
    /// Tag 14: ACPI 1.0 (RSDT).
    Old,
}

/// The boot information, decoded.
pub struct BootInfo {
    pub loader: &'static str,
    pub cmdline: &'static str,
    pub info_region: Region,
    pub available: heapless::Vec<Region, 64>,
    pub modules: heapless::Vec<Module, MAX_MODULES>,
    pub rsdp: Option<(RsdpSource, &'static [u8])>,
}

/// Why the boot information could not be used.
#[derive(Debug, defmt::Format)]
pub enum BootInfoError {
    /// EAX did not hold the multiboot2 magic: not started by a multiboot2 loader.
    BadMagic(u32),
    /// The information block is malformed.
    Malformed,
    /// More modules or memory ranges than the kernel keeps.
    TooMany(&'static str),
    /// A module's command line is not UTF-8 or is empty.
    BadModuleName { index: usize },
}

impl BootInfo {
    /// Decodes the information block at physical address `info`.
    pub fn read(magic: u32, info: u32) -> Result<Self, BootInfoError> {
        if magic != MULTIBOOT2_MAGIC {
            return Err(BootInfoError::BadMagic(magic));
        }
        let header = phys_to_virt(u64::from(info)).cast::<BootInformationHeader>();
        // Safety: a multiboot2 loader put the information block at `info`
        // (the magic says so), inside the direct map; `load` checks its
        // length and tag sequence.
        let mbi: BootInformation<'static> =
            unsafe { BootInformation::load(header) }.map_err(|_| BootInfoError::Malformed)?;
        let mbi: &'static BootInformation<'static> = MBI.call_once(|| mbi);
        let info_region = Region::new(u64::from(info), mbi.total_size() as u64);

        let mut available = heapless::Vec::new();
        if let Some(map) = mbi.memory_map_tag() {
            for area in map.memory_areas() {
                if area.typ() == MemoryAreaType::Available {
                    available
                        .push(Region::new(area.start_address(), area.size()))
                        .map_err(|_| BootInfoError::TooMany("memory ranges"))?;
                }
            }
        }

        let mut modules = heapless::Vec::new();
        for (index, m) in mbi.module_tags().enumerate() {
            let name = m
                .cmdline()
                .ok()
                .and_then(|c| c.split_whitespace().next())
                .ok_or(BootInfoError::BadModuleName { index })?;
            let region = Region {
                start: u64::from(m.start_address()),
                end: u64::from(m.end_address()),
            };
            modules
                .push(Module { name, region })
                .map_err(|_| BootInfoError::TooMany("boot modules"))?;
        }

        // The tags hold a copy of the RSDP right after their 8-byte header.
        let rsdp = if let Some(tag) = mbi.rsdp_v2_tag() {
            // Safety: the tag is at least 8 + 36 bytes (its type's size).
            Some((RsdpSource::New, unsafe { tag_payload(tag, 36) }))
        } else {
            mbi.rsdp_v1_tag().map(|tag| {
                // Safety: the tag is at least 8 + 20 bytes (its type's size).
                (RsdpSource::Old, unsafe { tag_payload(tag, 20) })
            })
        };

        Ok(Self {
            loader: mbi
                .boot_loader_name_tag()
                .and_then(|t| t.name().ok())
                .unwrap_or("?"),
            cmdline: mbi
                .command_line_tag()
                .and_then(|t| t.cmdline().ok())
                .unwrap_or(""),
            info_region,
            available,
            modules,
            rsdp,
        })
    }

    /// The module named `name`, if the image has one.
    pub fn module(&self, name: &str) -> Option<&Module> {
        self.modules.iter().find(|m| m.name == name)
    }

    /// The value of kernel option `key` (`key=value` on the command line).
    pub fn option(&self, key: &str) -> Option<&'static str> {
        self.cmdline
            .split_whitespace()
            .filter_map(|w| w.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }
}

/// The `len` bytes after a tag's 8-byte header.
///
/// # Safety
/// The tag must span at least `8 + len` bytes.
unsafe fn tag_payload<T>(tag: &'static T, len: usize) -> &'static [u8] {
    // Safety: forwarded to the caller.
    unsafe { core::slice::from_raw_parts((tag as *const T).cast::<u8>().add(8), len) }
}
