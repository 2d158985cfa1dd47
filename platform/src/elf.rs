//! A small ELF64 reader: the loadable segments of a service image, its
//! sections by name, its GNU build id. Bounds-checked: a truncated or
//! malformed file is an error, never a read outside the bytes.

/// Why an ELF file cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ElfError {
    /// No ELF magic.
    NotElf,
    /// Not a little-endian 64-bit x86-64 executable.
    WrongKind,
    /// A header or table points outside the file.
    Truncated,
    /// The entry point lies in no loadable, executable segment (for a
    /// service, a return to it would leave its image: a kernel or
    /// non-canonical address).
    BadEntry,
}

/// One loadable segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Segment {
    pub vaddr: u64,
    pub offset: u64,
    pub file_size: u64,
    pub mem_size: u64,
    pub readable: bool,
    pub writable: bool,
    pub executable: bool,
}

/// A parsed ELF64 file (borrowing its bytes).
#[derive(Clone, Copy, Debug)]
pub struct Elf<'a> {
    bytes: &'a [u8],
    pub entry: u64,
    phoff: usize,
    phnum: usize,
    phentsize: usize,
    shoff: usize,
    shnum: usize,
    shentsize: usize,
    shstrndx: usize,
}

fn u16_at(b: &[u8], at: usize) -> Result<u16, ElfError> {
    let s = b
        .get(at..at.checked_add(2).ok_or(ElfError::Truncated)?)
        .ok_or(ElfError::Truncated)?;
    Ok(u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, ElfError> {
    let s = b
        .get(at..at.checked_add(4).ok_or(ElfError::Truncated)?)
        .ok_or(ElfError::Truncated)?;
    Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn u64_at(b: &[u8], at: usize) -> Result<u64, ElfError> {
    Ok(u64::from(u32_at(b, at)?) | (u64::from(u32_at(b, at + 4)?) << 32))
}

impl<'a> Elf<'a> {
    /// Parses the file header of an x86-64 ELF64 executable.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, ElfError> {
        if bytes.get(0..4) != Some(b"\x7fELF") {
            return Err(ElfError::NotElf);
        }
        // 64-bit, little endian, executable, x86-64.
        if bytes.get(4) != Some(&2)
            || bytes.get(5) != Some(&1)
            || u16_at(bytes, 16)? != 2
            || u16_at(bytes, 18)? != 62
        {
            return Err(ElfError::WrongKind);
        }
        let elf = Self {
            bytes,
            entry: u64_at(bytes, 24)?,
            phoff: u64_at(bytes, 32)? as usize,
            shoff: u64_at(bytes, 40)? as usize,
            phentsize: usize::from(u16_at(bytes, 54)?),
            phnum: usize::from(u16_at(bytes, 56)?),
            shentsize: usize::from(u16_at(bytes, 58)?),
            shnum: usize::from(u16_at(bytes, 60)?),
            shstrndx: usize::from(u16_at(bytes, 62)?),
        };
        if elf.phentsize < 56 && elf.phnum > 0 || elf.shentsize < 64 && elf.shnum > 0 {
            return Err(ElfError::Truncated);
        }
        let mut entered = false;
        for s in elf.segments() {
            let s = s?;
            entered |= s.executable && elf.entry >= s.vaddr && elf.entry - s.vaddr < s.mem_size;
        }
        if !entered {
            return Err(ElfError::BadEntry);
        }
        Ok(elf)
    }

    /// The loadable segments, in file order.
    pub fn segments(&self) -> impl Iterator<Item = Result<Segment, ElfError>> + '_ {
        (0..self.phnum).filter_map(move |i| {
            let at = self.phoff.checked_add(i.checked_mul(self.phentsize)?)?;
            let b = self.bytes;
            let read = || -> Result<Option<Segment>, ElfError> {
                if u32_at(b, at)? != 1 {
                    return Ok(None); // not PT_LOAD
                }
                let flags = u32_at(b, at + 4)?;
                let s = Segment {
                    offset: u64_at(b, at + 8)?,
                    vaddr: u64_at(b, at + 16)?,
                    file_size: u64_at(b, at + 32)?,
                    mem_size: u64_at(b, at + 40)?,
                    executable: flags & 1 != 0,
                    writable: flags & 2 != 0,
                    readable: flags & 4 != 0,
                };
                let end = s
                    .offset
                    .checked_add(s.file_size)
                    .ok_or(ElfError::Truncated)?;
                if end > b.len() as u64 || s.file_size > s.mem_size {
                    return Err(ElfError::Truncated);
                }
                Ok(Some(s))
            };
            read().transpose()
        })
    }

    /// The bytes of a segment that come from the file.
    pub fn segment_bytes(&self, s: &Segment) -> &'a [u8] {
        let start = s.offset as usize;
        &self.bytes[start..start + s.file_size as usize]
    }

    /// The contents of the section named `name`, if there is one.
    pub fn section(&self, name: &str) -> Result<Option<&'a [u8]>, ElfError> {
        if self.shnum == 0 {
            return Ok(None);
        }
        let header = |i: usize| -> Result<usize, ElfError> {
            self.shoff
                .checked_add(i.checked_mul(self.shentsize).ok_or(ElfError::Truncated)?)
                .ok_or(ElfError::Truncated)
        };
        let strtab = header(self.shstrndx)?;
        let (str_off, str_size) = (
            u64_at(self.bytes, strtab + 24)? as usize,
            u64_at(self.bytes, strtab + 32)? as usize,
        );
        let names = self
            .bytes
            .get(str_off..str_off.checked_add(str_size).ok_or(ElfError::Truncated)?)
            .ok_or(ElfError::Truncated)?;
        for i in 0..self.shnum {
            let h = header(i)?;
            let name_off = u32_at(self.bytes, h)? as usize;
            let Some(rest) = names.get(name_off..) else {
                continue;
            };
            let end = rest.iter().position(|&c| c == 0).unwrap_or(rest.len());
            if &rest[..end] != name.as_bytes() {
                continue;
            }
            let kind = u32_at(self.bytes, h + 4)?;
            let (off, size) = (
                u64_at(self.bytes, h + 24)? as usize,
                u64_at(self.bytes, h + 32)? as usize,
            );
            if kind == 8 {
                return Ok(Some(&[])); // NOBITS
            }
            return self
                .bytes
                .get(off..off.checked_add(size).ok_or(ElfError::Truncated)?)
                .map(Some)
                .ok_or(ElfError::Truncated);
        }
        Ok(None)
    }

    /// The GNU build id (from the `.note.gnu.build-id` section), if any.
    pub fn build_id(&self) -> Option<&'a [u8]> {
        let note = self.section(".note.gnu.build-id").ok()??;
        if note.len() < 16 {
            return None;
        }
        let descsz = u32::from_le_bytes([note[4], note[5], note[6], note[7]]) as usize;
        note.get(16..16 + descsz)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::vec::Vec;

    /// A minimal x86-64 executable: one PT_LOAD, three sections
    /// (null, `.parallax.interfaces`, `.shstrtab`).
    fn tiny() -> Vec<u8> {
        let mut f = vec![0u8; 0x400];
        f[0..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[16..18].copy_from_slice(&2u16.to_le_bytes());
        f[18..20].copy_from_slice(&62u16.to_le_bytes());
        f[24..32].copy_from_slice(&0x40_1000u64.to_le_bytes());
        f[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
        f[40..48].copy_from_slice(&0x200u64.to_le_bytes()); // shoff
        f[54..56].copy_from_slice(&56u16.to_le_bytes());
        f[56..58].copy_from_slice(&1u16.to_le_bytes());
        f[58..60].copy_from_slice(&64u16.to_le_bytes());
        f[60..62].copy_from_slice(&3u16.to_le_bytes());
        f[62..64].copy_from_slice(&2u16.to_le_bytes()); // shstrndx
        // PT_LOAD R+X at 0x401000 from offset 0x100, 0x40 bytes (0x80 in memory)
        let ph = 64;
        f[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
        f[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes());
        f[ph + 8..ph + 16].copy_from_slice(&0x100u64.to_le_bytes());
        f[ph + 16..ph + 24].copy_from_slice(&0x40_1000u64.to_le_bytes());
        f[ph + 32..ph + 40].copy_from_slice(&0x40u64.to_le_bytes());
        f[ph + 40..ph + 48].copy_from_slice(&0x80u64.to_le_bytes());
        // section names at 0x300
        let names = b"\0.parallax.interfaces\0.shstrtab\0";
        f[0x300..0x300 + names.len()].copy_from_slice(names);
        // section 1: interfaces, contents at 0x180, 8 bytes
        let s1 = 0x200 + 64;
        f[s1..s1 + 4].copy_from_slice(&1u32.to_le_bytes());
        f[s1 + 4..s1 + 8].copy_from_slice(&1u32.to_le_bytes());
        f[s1 + 24..s1 + 32].copy_from_slice(&0x180u64.to_le_bytes());
        f[s1 + 32..s1 + 40].copy_from_slice(&8u64.to_le_bytes());
        f[0x180..0x188].copy_from_slice(b"IFACE!!!");
        // section 2: .shstrtab
        let s2 = 0x200 + 128;
        f[s2..s2 + 4].copy_from_slice(&22u32.to_le_bytes());
        f[s2 + 4..s2 + 8].copy_from_slice(&3u32.to_le_bytes());
        f[s2 + 24..s2 + 32].copy_from_slice(&0x300u64.to_le_bytes());
        f[s2 + 32..s2 + 40].copy_from_slice(&(names.len() as u64).to_le_bytes());
        f
    }

    #[test]
    fn reads_segments_and_sections() {
        let f = tiny();
        let e = Elf::parse(&f).unwrap();
        assert_eq!(e.entry, 0x40_1000);
        let segs: Vec<_> = e.segments().collect::<Result<_, _>>().unwrap();
        assert_eq!(segs.len(), 1);
        assert_eq!(
            (segs[0].vaddr, segs[0].file_size, segs[0].mem_size),
            (0x40_1000, 0x40, 0x80)
        );
        assert!(segs[0].readable && segs[0].executable && !segs[0].writable);
        assert_eq!(
            e.section(".parallax.interfaces").unwrap(),
            Some(&b"IFACE!!!"[..])
        );
        assert_eq!(e.section(".missing").unwrap(), None);
        assert_eq!(e.build_id(), None);
    }

    #[test]
    fn refuses_what_is_not_an_x86_64_executable() {
        assert_eq!(
            Elf::parse(b"not an elf at all").unwrap_err(),
            ElfError::NotElf
        );
        let mut f = tiny();
        f[4] = 1; // 32-bit
        assert_eq!(Elf::parse(&f).unwrap_err(), ElfError::WrongKind);
        let mut f = tiny();
        f[64 + 32..64 + 40].copy_from_slice(&0x10000u64.to_le_bytes()); // segment past the end
        assert_eq!(Elf::parse(&f).unwrap_err(), ElfError::Truncated);
        assert_eq!(Elf::parse(&tiny()[..40]).unwrap_err(), ElfError::Truncated);
    }

    #[test]
    fn the_entry_must_lie_in_a_loaded_executable_segment() {
        let entry = |at: u64, flags: u32| {
            let mut f = tiny();
            f[24..32].copy_from_slice(&at.to_le_bytes());
            f[64 + 4..64 + 8].copy_from_slice(&flags.to_le_bytes());
            Elf::parse(&f).map(|e| e.entry)
        };
        assert_eq!(
            entry(0x40_107f, 5),
            Ok(0x40_107f),
            "the segment's last byte"
        );
        for at in [
            0x40_0fff,
            0x40_1080,
            0x8000_0000_0000_0000,
            0xffff_ffff_8000_0000,
            0,
        ] {
            assert_eq!(entry(at, 5), Err(ElfError::BadEntry), "{at:#x}");
        }
        assert_eq!(
            entry(0x40_1000, 6),
            Err(ElfError::BadEntry),
            "not executable"
        );
    }

    proptest! {
        #[test]
        fn mutated_files_never_panic(flips in proptest::collection::vec((0usize..0x400, any::<u8>()), 1..12)) {
            let mut f = tiny();
            for (at, v) in flips {
                f[at] = v;
            }
            if let Ok(e) = Elf::parse(&f) {
                for s in e.segments().flatten() {
                    let _ = e.segment_bytes(&s);
                }
                let _ = e.section(".parallax.interfaces");
                let _ = e.build_id();
            }
        }
    }
}
