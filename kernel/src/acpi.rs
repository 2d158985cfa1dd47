//! The firmware's ACPI tables, read once at boot: which tables there are, the
//! CPUs and IOAPICs (MADT, decoded by the `acpi` crate), and the IOMMU units
//! and reserved memory regions (every DMAR, merged by `platform`).

use crate::bootinfo::RsdpSource;
use crate::mem::DirectMap;
use core::pin::Pin;
use platform::acpi::dmar::{Dmar, DmarError};
use platform::acpi::{AcpiError, RootTable, Rsdp, Table};

/// What the kernel learned from ACPI.
pub struct AcpiInfo {
    pub cpus: u32,
    pub ioapics: u32,
    /// The first IOAPIC's registers and first GSI.
    pub ioapic: Option<(u64, u32)>,
    /// ISA line -> (GSI, MPS flags), where the MADT overrides the identity.
    pub overrides: [Option<(u32, u16)>; 16],
    /// `None` where the firmware has no DMAR: no IOMMU.
    pub dmar: Option<Dmar<'static>>,
    /// Why the DMAR tables could not be used (the IOMMU then stays off;
    /// the rest of ACPI is used all the same).
    pub dmar_problem: Option<DmarError>,
}

/// Why ACPI could not be read at all.
#[derive(Debug, defmt::Format)]
pub enum AcpiProblem {
    NoRsdp,
    Table(AcpiError),
}

/// Walks the tables from the RSDP the boot loader copied, logging each.
pub fn read(rsdp: Option<(RsdpSource, &'static [u8])>) -> Result<AcpiInfo, AcpiProblem> {
    let (source, bytes) = rsdp.ok_or(AcpiProblem::NoRsdp)?;
    let rsdp = Rsdp::parse(bytes).map_err(AcpiProblem::Table)?;
    let root = RootTable::read(&DirectMap, &rsdp).map_err(AcpiProblem::Table)?;
    defmt::info!(
        "ACPI: RSDP revision {=u8} from the {=str} tag, root table {=str} at {=u64:#x}",
        rsdp.revision,
        if source == RsdpSource::New {
            "ACPI 2.0"
        } else {
            "ACPI 1.0"
        },
        signature_str(&root.table),
        root.table.address
    );

    let mut info = AcpiInfo {
        cpus: 0,
        ioapics: 0,
        ioapic: None,
        overrides: [None; 16],
        dmar: None,
        dmar_problem: None,
    };
    let mut dmars: heapless::Vec<Table<'static>, { platform::acpi::dmar::MAX_TABLES }> =
        heapless::Vec::new();
    for table in root.tables(&DirectMap) {
        let table = match table {
            Ok(t) => t,
            Err(e) => {
                defmt::warn!("ACPI: skipping a table: {}", e);
                continue;
            }
        };
        defmt::info!(
            "ACPI: table {=str} at {=u64:#x}, {=usize} bytes",
            signature_str(&table),
            table.address,
            table.bytes.len()
        );
        match &table.signature() {
            b"APIC" => madt(&table, &mut info),
            b"DMAR" => {
                defmt::debug!("ACPI: DMAR bytes {=[u8]:#04x}", table.bytes);
                if dmars.push(table).is_err() {
                    defmt::warn!(
                        "ACPI: more than {=usize} DMAR tables; ignoring this one",
                        dmars.capacity()
                    );
                }
            }
            _ => {}
        }
    }
    if !dmars.is_empty() {
        match Dmar::parse(dmars.iter().copied()) {
            Ok(d) => info.dmar = Some(d),
            Err(e) => info.dmar_problem = Some(e),
        }
    }
    Ok(info)
}

/// A table's signature as text ("????" if it is not ASCII).
fn signature_str<'t>(table: &'t Table<'_>) -> &'t str {
    core::str::from_utf8(&table.bytes[..4]).unwrap_or("????")
}

/// Counts CPUs and IOAPICs from the MADT.
fn madt(table: &Table<'static>, info: &mut AcpiInfo) {
    use acpi::madt::{Madt, MadtEntry};
    if table.bytes.len() < core::mem::size_of::<Madt>() {
        defmt::warn!(
            "ACPI: MADT of {=usize} bytes is too short",
            table.bytes.len()
        );
        return;
    }
    // Safety: `table.bytes` is the whole validated table (its length field
    // equals the slice length and lies in the direct map), `Madt` is packed
    // (alignment 1) and no longer than the slice, and `entries` reads only
    // within the length field. The memory is never moved or written.
    let madt = unsafe { Pin::new_unchecked(&*table.bytes.as_ptr().cast::<Madt>()) };
    for entry in madt.entries() {
        match entry {
            // Bit 0: enabled; bit 1: online capable (can be brought up later).
            MadtEntry::LocalApic(e) if { e.flags } & 3 != 0 => {
                info.cpus += 1;
                defmt::info!("ACPI: CPU with APIC id {=u8}", e.apic_id);
            }
            MadtEntry::LocalX2Apic(e) if { e.flags } & 3 != 0 => {
                info.cpus += 1;
                defmt::info!("ACPI: CPU with x2APIC id {=u32}", { e.x2apic_id });
            }
            MadtEntry::IoApic(e) => {
                info.ioapics += 1;
                if info.ioapic.is_none() {
                    let (address, gsi) = (e.io_apic_address, e.global_system_interrupt_base);
                    info.ioapic = Some((u64::from(address), gsi));
                }
                defmt::info!(
                    "ACPI: IOAPIC id {=u8} at {=u32:#x}, interrupts from {=u32}",
                    e.io_apic_id,
                    { e.io_apic_address },
                    { e.global_system_interrupt_base }
                );
            }
            MadtEntry::InterruptSourceOverride(e) if e.irq < 16 => {
                info.overrides[usize::from(e.irq)] =
                    Some(({ e.global_system_interrupt }, { e.flags }));
                defmt::info!(
                    "ACPI: ISA line {=u8} is GSI {=u32} (flags {=u16:#x})",
                    e.irq,
                    { e.global_system_interrupt },
                    { e.flags }
                );
            }
            _ => {}
        }
    }
}

/// Logs the DMA remapping description (RMRR-1): every unit and region, and
/// each device scope: a region's at info level (they are few, and what
/// RMRR policy is about), a unit's at info where the table has at most
/// [`SCOPES_LOGGED`] scopes, else at debug (a server's hundreds would
/// cost the serial log seconds).
pub fn log_dmar(dmar: &Dmar<'_>) {
    defmt::info!(
        "DMAR: {=u8} table(s), {=u8}-bit DMA addresses, interrupt remapping {=bool}, x2APIC opt-out {=bool}",
        dmar.tables,
        dmar.address_width,
        dmar.interrupt_remapping,
        dmar.x2apic_opt_out
    );
    defmt::info!(
        "DMAR: {=usize} unit(s), {=usize} reserved region(s), {=usize} device scope(s)",
        dmar.drhd_count,
        dmar.rmrr_count,
        dmar.scope_count
    );
    if dmar.width_conflict {
        defmt::warn!("DMAR: tables disagree on the address width; using the smallest");
    }
    let each = dmar.scope_count <= SCOPES_LOGGED;
    if !each {
        defmt::info!(
            "DMAR: the units' {=usize} device scopes are logged at debug level",
            dmar.scope_count
        );
    }
    for d in dmar.drhds() {
        defmt::info!(
            "DMAR: DRHD at {=u64:#x} ({=u32} pages), segment {=u16}, {=str}, {=usize} device scope(s)",
            d.register_base,
            d.register_pages,
            d.segment,
            if d.include_pci_all {
                "all PCI devices"
            } else {
                "listed devices"
            },
            d.scopes.len()
        );
        for s in d.scopes.iter() {
            log_scope(&s, each);
        }
    }
    for r in dmar.rmrrs() {
        defmt::info!(
            "DMAR: RMRR {=u64:#x}..={=u64:#x} ({=u64} KiB), segment {=u16}, {=usize} device scope(s)",
            r.base,
            r.limit,
            r.len() / 1024,
            r.segment,
            r.scopes.len()
        );
        for s in r.scopes.iter() {
            log_scope(&s, true);
        }
    }
    if dmar.other_structures > 0 {
        defmt::info!(
            "DMAR: {=u16} other structure(s) (ATSR, RHSA, ANDD, SATC) not used",
            dmar.other_structures
        );
    }
}

/// The most device scopes logged at info level.
const SCOPES_LOGGED: usize = 32;

/// One device scope, at `info` or debug level.
fn log_scope(s: &platform::acpi::dmar::DeviceScope<'_>, info: bool) {
    macro_rules! line {
        ($level:ident) => {
            match s.direct_bdf() {
                Some((bus, dev, func)) => defmt::$level!(
                    "DMAR:   scope {} {=u8:02x}:{=u8:02x}.{=u8}",
                    s.kind,
                    bus,
                    dev,
                    func
                ),
                None => {
                    // The first hops (paths are short; the count says).
                    let mut hops = [(0u8, 0u8); 8];
                    let n = s.path.len().min(hops.len());
                    for (slot, hop) in hops.iter_mut().zip(s.path.iter()) {
                        *slot = (hop.device, hop.function);
                    }
                    defmt::$level!(
                        "DMAR:   scope {} id {=u8}, bus {=u8:02x}, path {} ({=usize} hops)",
                        s.kind,
                        s.enumeration_id,
                        s.start_bus,
                        &hops[..n],
                        s.path.len()
                    )
                }
            }
        };
    }
    if info { line!(info) } else { line!(debug) }
}
