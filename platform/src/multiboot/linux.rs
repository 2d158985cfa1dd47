//! Linux's x86 boot protocol (Documentation/arch/x86/boot.rst) for a
//! bzImage: the file starts with a real-mode part (a boot sector and
//! `setup_sects` sectors of setup code) holding the setup header ("HdrS" at
//! 0x202), followed by the protected-mode kernel. A loader that takes the
//! 32-bit entry skips the real-mode code: it loads the protected-mode
//! kernel at 1 MiB (or at its preferred address when it is relocatable and
//! fits there), fills a `boot_params` (the "zero page": the setup header
//! copied from the file, the memory map as e820 entries, the command line,
//! the initrd) and enters `code32_start` in flat protected mode with
//! segments `__BOOT_CS` (0x10) and `__BOOT_DS` (0x18) of its own GDT, ESI
//! = the `boot_params`, EBX, EBP and EDI zero.
//!
//! Parallax's vCPUs start in flat protected mode with EAX and EBX set only:
//! [`trampoline`] is a few instructions the loader places in low memory that
//! load that GDT and those registers and jump to the kernel.

use super::{ImageError, LoadPlan, Segment, memory_map, u16_at, u32_at, u64_at};

/// The setup header's magic, at [`MAGIC_AT`].
pub const MAGIC: &[u8; 4] = b"HdrS";
pub const MAGIC_AT: usize = 0x202;
/// The oldest boot protocol taken: 2.06 (`cmdline_size`, the 32-bit entry
/// documented, `kernel_alignment` and `relocatable_kernel`).
pub const MIN_VERSION: u16 = 0x0206;
/// `loadflags`: the protected-mode kernel is loaded at 1 MiB (a bzImage).
pub const LOADED_HIGH: u8 = 1 << 0;
/// `loadflags`: `heap_end_ptr` is valid (the real-mode setup's heap).
const CAN_USE_HEAP: u8 = 1 << 7;
/// `type_of_loader`: a loader with no assigned ID.
pub const LOADER_UNDEFINED: u8 = 0xff;
/// Where the protected-mode kernel of a bzImage goes by default.
pub const HIGH_LOAD: u64 = 0x10_0000;

/// Offsets in `boot_params` (and in the file's first sectors, where the
/// setup header lies at the same place).
pub mod at {
    pub const ACPI_RSDP_ADDR: usize = 0x070;
    pub const ALT_MEM_K: usize = 0x1e0;
    pub const E820_ENTRIES: usize = 0x1e8;
    pub const SETUP_SECTS: usize = 0x1f1;
    pub const BOOT_FLAG: usize = 0x1fe;
    pub const JUMP: usize = 0x200;
    pub const VERSION: usize = 0x206;
    pub const TYPE_OF_LOADER: usize = 0x210;
    pub const LOADFLAGS: usize = 0x211;
    pub const CODE32_START: usize = 0x214;
    pub const RAMDISK_IMAGE: usize = 0x218;
    pub const RAMDISK_SIZE: usize = 0x21c;
    pub const HEAP_END_PTR: usize = 0x224;
    pub const CMD_LINE_PTR: usize = 0x228;
    pub const INITRD_ADDR_MAX: usize = 0x22c;
    pub const KERNEL_ALIGNMENT: usize = 0x230;
    pub const RELOCATABLE_KERNEL: usize = 0x234;
    pub const CMDLINE_SIZE: usize = 0x238;
    pub const PREF_ADDRESS: usize = 0x258;
    pub const INIT_SIZE: usize = 0x260;
    pub const E820_TABLE: usize = 0x2d0;
    /// The end of the setup header as boot_params holds it (2.15's
    /// `kernel_info_offset` is its last field).
    pub const HEADER_END: usize = 0x26c;
}

/// Bytes of `boot_params`.
pub const BOOT_PARAMS_LEN: usize = 4096;
/// e820 entries `boot_params` holds at most.
const E820_MAX: usize = 128;

/// What the loader needs of a bzImage's setup header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SetupHeader {
    /// The boot protocol version (0x020f for 2.15).
    pub version: u16,
    /// Bytes of the real-mode part: the boot sector and the setup sectors.
    pub setup_len: usize,
    /// Bytes of the protected-mode kernel (`syssize` paragraphs).
    pub kernel_len: usize,
    pub loadflags: u8,
    pub code32_start: u32,
    /// The highest address the initrd may occupy.
    pub initrd_addr_max: u32,
    pub kernel_alignment: u32,
    pub relocatable: bool,
    /// The longest command line the kernel takes, without its NUL.
    pub cmdline_size: u32,
    /// Where a relocatable kernel would rather be loaded (2.10+; else
    /// [`HIGH_LOAD`]).
    pub pref_address: u64,
    /// Bytes the kernel needs from its load address to boot (2.10+; else
    /// its length).
    pub init_size: u32,
}

/// Whether `image` has a Linux setup header (it may still be refused).
pub fn is_bzimage(image: &[u8]) -> bool {
    image.get(MAGIC_AT..MAGIC_AT + 4) == Some(MAGIC)
}

/// Reads and checks the setup header: a protocol of at least
/// [`MIN_VERSION`], a bzImage (`LOADED_HIGH`), a file that holds the
/// sectors and paragraphs it names.
pub fn header(image: &[u8]) -> Result<SetupHeader, ImageError> {
    if !is_bzimage(image) {
        return Err(ImageError::NoHeader);
    }
    let truncated = ImageError::LinuxTruncated;
    let version = u16_at(image, at::VERSION).ok_or(truncated)?;
    if version < MIN_VERSION {
        return Err(ImageError::LinuxProtocol(version));
    }
    // The whole header of this version must be in the file.
    let end = if version >= 0x020a {
        at::INIT_SIZE + 4
    } else {
        at::CMDLINE_SIZE + 4
    };
    if image.len() < end {
        return Err(truncated);
    }
    let byte = |o: usize| image[o];
    let word = |o: usize| u32_at(image, o).unwrap_or(0);
    let loadflags = byte(at::LOADFLAGS);
    if loadflags & LOADED_HIGH == 0 {
        return Err(ImageError::LinuxNotLoadedHigh);
    }
    // setup_sects 0 means 4, for old kernels' sake.
    let sects = match byte(at::SETUP_SECTS) {
        0 => 4,
        n => usize::from(n),
    };
    let setup_len = (sects + 1) * 512;
    let syssize = word(0x1f4);
    let kernel_len = usize::try_from(u64::from(syssize) * 16).map_err(|_| truncated)?;
    if kernel_len == 0 {
        return Err(ImageError::Empty);
    }
    if setup_len
        .checked_add(kernel_len)
        .is_none_or(|e| e > image.len())
    {
        return Err(truncated);
    }
    let (pref_address, init_size) = if version >= 0x020a {
        (
            u64_at(image, at::PREF_ADDRESS).unwrap_or(HIGH_LOAD),
            word(at::INIT_SIZE),
        )
    } else {
        (HIGH_LOAD, 0)
    };
    Ok(SetupHeader {
        version,
        setup_len,
        kernel_len,
        loadflags,
        code32_start: word(at::CODE32_START),
        initrd_addr_max: word(at::INITRD_ADDR_MAX),
        kernel_alignment: word(at::KERNEL_ALIGNMENT),
        relocatable: byte(at::RELOCATABLE_KERNEL) != 0,
        cmdline_size: word(at::CMDLINE_SIZE),
        pref_address,
        init_size: init_size.max(u32::try_from(kernel_len).map_err(|_| truncated)?),
    })
}

/// The load plan of a bzImage for a guest with `ram_bytes` of RAM: its
/// protected-mode kernel at [`HIGH_LOAD`], or at `pref_address` when the
/// kernel is relocatable and `init_size` bytes fit there (aligned to
/// `kernel_alignment`, above 1 MiB); the segment covers `init_size` (the
/// memory the kernel needs to decompress itself), so modules go after it.
/// The entry is `code32_start`, moved with the kernel.
pub fn plan(image: &[u8], ram_bytes: u64) -> Result<LoadPlan, ImageError> {
    let h = header(image)?;
    let need = u64::from(h.init_size);
    let aligned =
        h.kernel_alignment.is_power_of_two() && h.pref_address % u64::from(h.kernel_alignment) == 0;
    let load = if h.relocatable
        && aligned
        && h.pref_address >= HIGH_LOAD
        && h.pref_address
            .checked_add(need)
            .is_some_and(|e| e <= ram_bytes)
    {
        h.pref_address
    } else {
        HIGH_LOAD
    };
    let entry = u64::from(h.code32_start)
        .checked_sub(HIGH_LOAD)
        .and_then(|off| off.checked_add(load))
        .and_then(|e| u32::try_from(e).ok())
        .ok_or(ImageError::BadAddresses)?;
    let mut segments = heapless::Vec::new();
    let _ = segments.push(Segment {
        file_offset: h.setup_len,
        file_len: h.kernel_len,
        gpa: load,
        mem_len: need,
    });
    Ok(LoadPlan {
        segments,
        entry,
        flags: 0,
        format: super::Format::Linux,
    })
}

/// Where the loader's own pieces for a Linux guest go, beside what it
/// loads: the `boot_params` page, then the trampoline (with its GDT) and the
/// command line in the page after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    pub boot_params: u32,
    pub trampoline: u32,
    pub cmdline: u32,
}

impl Placement {
    /// `boot_params` at `base` (page-aligned), the rest in the next page.
    pub const fn at(base: u32) -> Self {
        Self {
            boot_params: base,
            trampoline: base + 0x1000,
            cmdline: base + 0x1100,
        }
    }
}

/// Why `boot_params` could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ParamsError {
    /// The command line is longer than the kernel's `cmdline_size`.
    CmdlineTooLong { len: usize, max: u32 },
    /// The initrd ends above the kernel's `initrd_addr_max`.
    InitrdTooHigh { end: u32, max: u32 },
    /// Not the image that was planned: its header does not read.
    Image(ImageError),
}

/// What the loader gives a Linux kernel beside its image.
#[derive(Clone, Copy, Debug)]
pub struct Params<'a> {
    /// Bytes of RAM, from guest-physical 0.
    pub ram_bytes: u64,
    pub place: Placement,
    pub cmdline: &'a str,
    /// The initrd's first byte and the byte past its end.
    pub initrd: Option<(u32, u32)>,
    /// The ACPI RSDP's address (0: none).
    pub rsdp: u64,
}

/// Builds `boot_params` into `out`: the file's setup header (and
/// `code32_start` as [`plan`] moved it), `type_of_loader` 0xff, the command
/// line's address, the initrd, the memory map as e820 entries (the same as
/// the other formats'), `alt_mem_k`, and the ACPI RSDP's address (protocol
/// 2.14 and later).
pub fn build_boot_params(
    image: &[u8],
    plan: &LoadPlan,
    p: &Params<'_>,
    out: &mut [u8; BOOT_PARAMS_LEN],
) -> Result<(), ParamsError> {
    let Params {
        ram_bytes,
        place,
        cmdline,
        initrd,
        rsdp,
    } = *p;
    let h = header(image).map_err(ParamsError::Image)?;
    if cmdline.len() > h.cmdline_size as usize {
        return Err(ParamsError::CmdlineTooLong {
            len: cmdline.len(),
            max: h.cmdline_size,
        });
    }
    if let Some((_, end)) = initrd
        && end.saturating_sub(1) > h.initrd_addr_max
    {
        return Err(ParamsError::InitrdTooHigh {
            end,
            max: h.initrd_addr_max,
        });
    }
    out.fill(0);
    // The header as far as the file's jump at 0x200 says it goes (its
    // second byte is the offset of the code after the header).
    let end = (at::JUMP + 2 + usize::from(image[at::JUMP + 1]))
        .clamp(at::CMDLINE_SIZE + 4, at::HEADER_END)
        .min(image.len());
    out[at::SETUP_SECTS..end].copy_from_slice(&image[at::SETUP_SECTS..end]);
    let put32 = |out: &mut [u8], o: usize, v: u32| out[o..o + 4].copy_from_slice(&v.to_le_bytes());
    let put64 = |out: &mut [u8], o: usize, v: u64| out[o..o + 8].copy_from_slice(&v.to_le_bytes());
    out[at::TYPE_OF_LOADER] = LOADER_UNDEFINED;
    // No real-mode setup runs: no heap for it.
    out[at::LOADFLAGS] = h.loadflags & !CAN_USE_HEAP;
    put32(out, at::HEAP_END_PTR, 0);
    put32(out, at::CODE32_START, plan.entry);
    put32(out, at::CMD_LINE_PTR, place.cmdline);
    if let Some((start, end)) = initrd {
        put32(out, at::RAMDISK_IMAGE, start);
        put32(out, at::RAMDISK_SIZE, end - start);
    }
    let map = memory_map(ram_bytes);
    out[at::E820_ENTRIES] = map.len().min(E820_MAX) as u8;
    for (i, (start, len, kind)) in map.iter().enumerate() {
        let o = at::E820_TABLE + i * 20;
        put64(out, o, *start);
        put64(out, o + 8, *len);
        put32(out, o + 16, *kind);
    }
    put32(
        out,
        at::ALT_MEM_K,
        (ram_bytes.saturating_sub(HIGH_LOAD) / 1024) as u32,
    );
    if h.version >= 0x020e {
        put64(out, at::ACPI_RSDP_ADDR, rsdp);
    }
    Ok(())
}

/// Bytes of the trampoline and its GDT.
pub const TRAMPOLINE_LEN: usize = 0x60;
/// Offset of its code (the vCPU's entry) from its start.
pub const TRAMPOLINE_ENTRY: u32 = 0x30;

/// The trampoline, to be placed at `place.trampoline`: a GDT (null, null,
/// `__BOOT_CS` flat code at 0x10, `__BOOT_DS` flat data at 0x18), its
/// descriptor, and code entered at `place.trampoline +
/// `[`TRAMPOLINE_ENTRY`] that loads the GDT and the data segments, sets
/// ESI = `boot_params` and EBX = EBP = EDI = 0, and jumps far to
/// `0x10:entry`.
pub fn trampoline(place: &Placement, entry: u32) -> [u8; TRAMPOLINE_LEN] {
    let mut t = [0u8; TRAMPOLINE_LEN];
    let base = place.trampoline;
    t[0x10..0x18].copy_from_slice(&0x00cf_9a00_0000_ffffu64.to_le_bytes());
    t[0x18..0x20].copy_from_slice(&0x00cf_9200_0000_ffffu64.to_le_bytes());
    // The GDT's descriptor: limit, base.
    t[0x20..0x22].copy_from_slice(&0x1fu16.to_le_bytes());
    t[0x22..0x26].copy_from_slice(&base.to_le_bytes());
    let mut code: heapless::Vec<u8, 0x30> = heapless::Vec::new();
    let mut emit = |bytes: &[u8]| {
        let _ = code.extend_from_slice(bytes);
    };
    emit(&[0x0f, 0x01, 0x15]); // lgdt [disp32]
    emit(&(base + 0x20).to_le_bytes());
    emit(&[0xb8, 0x18, 0, 0, 0]); // mov eax, 0x18
    for sreg in [0xd8, 0xc0, 0xd0, 0xe0, 0xe8] {
        emit(&[0x8e, sreg]); // mov ds/es/ss/fs/gs, eax
    }
    emit(&[0xbe]); // mov esi, imm32
    emit(&place.boot_params.to_le_bytes());
    emit(&[0x31, 0xdb, 0x31, 0xed, 0x31, 0xff, 0xfa]); // xor ebx, ebp, edi; cli
    emit(&[0xea]); // jmp far 0x10:entry
    emit(&entry.to_le_bytes());
    emit(&[0x10, 0x00]);
    let at = TRAMPOLINE_ENTRY as usize;
    t[at..at + code.len()].copy_from_slice(&code);
    t
}
