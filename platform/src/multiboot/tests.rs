use super::*;
use proptest::prelude::*;
use std::vec::Vec as StdVec;

const MIB: u64 = 1 << 20;

/// An image with an a.out-kludge header at offset 0x40 of a file whose
/// loadable part starts at 0x00 and is loaded at 1 MiB.
fn kludge_image(flags_extra: u32) -> StdVec<u8> {
    let mut img = vec![0u8; 0x2000];
    let flags = FLAG_ALIGN_MODULES | FLAG_MEMORY_INFO | FLAG_ADDRESSES | flags_extra;
    let fields = [
        HEADER_MAGIC,
        flags,
        0u32.wrapping_sub(HEADER_MAGIC.wrapping_add(flags)),
        0x10_0040, // header_addr
        0x10_0000, // load_addr
        0x10_1800, // load_end_addr
        0x10_4000, // bss_end_addr
        0x10_0100, // entry_addr
    ];
    for (i, f) in fields.iter().enumerate() {
        img[0x40 + 4 * i..0x44 + 4 * i].copy_from_slice(&f.to_le_bytes());
    }
    img
}

fn layout() -> GuestLayout {
    GuestLayout::new(16 * MIB)
}

#[test]
fn the_aout_kludge_header_gives_the_plan() {
    let p = plan(&kludge_image(0), &layout()).unwrap();
    assert_eq!(p.entry, 0x10_0100);
    assert_eq!(
        p.segments.as_slice(),
        &[Segment {
            file_offset: 0,
            file_len: 0x1800,
            gpa: 0x10_0000,
            mem_len: 0x4000
        }]
    );
}

/// A minimal ELF with one PT_LOAD, 32- or 64-bit.
fn elf(class64: bool, paddr: u64, filesz: u64, memsz: u64) -> StdVec<u8> {
    let mut img = vec![0u8; 0x3000];
    img[0..4].copy_from_slice(b"\x7fELF");
    img[4] = if class64 { 2 } else { 1 };
    img[5] = 1;
    let flags = FLAG_MEMORY_INFO;
    let hdr = [
        HEADER_MAGIC,
        flags,
        0u32.wrapping_sub(HEADER_MAGIC.wrapping_add(flags)),
    ];
    for (i, f) in hdr.iter().enumerate() {
        img[0x1000 + 4 * i..0x1004 + 4 * i].copy_from_slice(&f.to_le_bytes());
    }
    if class64 {
        img[24..32].copy_from_slice(&0x10_0010u64.to_le_bytes());
        img[32..40].copy_from_slice(&64u64.to_le_bytes());
        img[54..56].copy_from_slice(&56u16.to_le_bytes());
        img[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = 64;
        img[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
        img[ph + 8..ph + 16].copy_from_slice(&0x1000u64.to_le_bytes());
        img[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes());
        img[ph + 32..ph + 40].copy_from_slice(&filesz.to_le_bytes());
        img[ph + 40..ph + 48].copy_from_slice(&memsz.to_le_bytes());
    } else {
        img[24..28].copy_from_slice(&0x10_0010u32.to_le_bytes());
        img[28..32].copy_from_slice(&52u32.to_le_bytes());
        img[42..44].copy_from_slice(&32u16.to_le_bytes());
        img[44..46].copy_from_slice(&1u16.to_le_bytes());
        let ph = 52;
        img[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
        img[ph + 4..ph + 8].copy_from_slice(&0x1000u32.to_le_bytes());
        img[ph + 12..ph + 16].copy_from_slice(&(paddr as u32).to_le_bytes());
        img[ph + 16..ph + 20].copy_from_slice(&(filesz as u32).to_le_bytes());
        img[ph + 20..ph + 24].copy_from_slice(&(memsz as u32).to_le_bytes());
    }
    img
}

#[test]
fn elf32_and_elf64_segments_go_to_their_physical_addresses() {
    for class64 in [false, true] {
        let p = plan(&elf(class64, 0x20_0000, 0x800, 0x3000), &layout()).unwrap();
        assert_eq!(p.entry, 0x10_0010);
        assert_eq!(
            p.segments.as_slice(),
            &[Segment {
                file_offset: 0x1000,
                file_len: 0x800,
                gpa: 0x20_0000,
                mem_len: 0x3000
            }],
            "class64 {class64}"
        );
    }
}

#[test]
fn images_that_do_not_fit_are_refused_with_the_range() {
    let big = elf(true, 15 * MIB, 0x800, 2 * MIB);
    assert_eq!(
        plan(&big, &layout()),
        Err(ImageError::OutsideRam {
            start: 15 * MIB,
            end: 17 * MIB
        })
    );
    let low = elf(true, 0x1000, 0x800, 0x1000);
    assert!(
        matches!(plan(&low, &layout()), Err(ImageError::OutsideRam { .. })),
        "over the info block"
    );
    let vga = elf(true, 0xb_8000, 0x800, 0x1000);
    assert!(
        matches!(plan(&vga, &layout()), Err(ImageError::OutsideRam { .. })),
        "in the legacy hole"
    );
}

#[test]
fn malformed_images_are_named() {
    assert_eq!(plan(&[0u8; 100], &layout()), Err(ImageError::NoHeader));
    let mut bad_sum = kludge_image(0);
    bad_sum[0x48] ^= 1;
    assert_eq!(plan(&bad_sum, &layout()), Err(ImageError::BadChecksum));
    assert!(matches!(
        plan(&kludge_image(FLAG_VIDEO_MODE), &layout()),
        Err(ImageError::UnsupportedFlags(_))
    ));
    let mut past_end = kludge_image(0);
    past_end[0x40 + 20..0x40 + 24].copy_from_slice(&0x10_9000u32.to_le_bytes()); // load_end beyond the file
    assert_eq!(plan(&past_end, &layout()), Err(ImageError::BadAddresses));
    let mut not_elf = elf(true, 0x20_0000, 0x800, 0x1000);
    not_elf[1] = b'X';
    assert_eq!(plan(&not_elf, &layout()), Err(ImageError::NotElf));
    let mut bad_ph = elf(true, 0x20_0000, 0x800, 0x1000);
    bad_ph[32..40].copy_from_slice(&0xffff_ffffu64.to_le_bytes()); // program headers off the end
    assert_eq!(plan(&bad_ph, &layout()), Err(ImageError::BadElf));
}

#[test]
fn the_information_block_describes_ram_and_points_at_its_strings() {
    let mut out = [0u8; INFO_SIZE];
    let n = build_info(16 * MIB, "hello world", "Parallax", &[], &mut out).unwrap();
    let u32_at = |at: usize| u32::from_le_bytes(out[at..at + 4].try_into().unwrap());
    assert_eq!(u32_at(0), 0x245);
    assert_eq!((u32_at(4), u32_at(8)), (639, 15 * 1024));
    let at = |gpa: u32| (gpa as u64 - INFO_GPA) as usize;
    let cmdline = at(u32_at(16));
    assert_eq!(&out[cmdline..cmdline + 12], b"hello world\0");
    let loader = at(u32_at(64));
    assert_eq!(&out[loader..loader + 9], b"Parallax\0");
    assert!(loader + 9 <= n);
    let (mmap, len) = (at(u32_at(48)), u32_at(44) as usize);
    let entries: StdVec<(u64, u64, u32)> = out[mmap..mmap + len]
        .chunks(24)
        .map(|e| {
            (
                u64::from_le_bytes(e[4..12].try_into().unwrap()),
                u64::from_le_bytes(e[12..20].try_into().unwrap()),
                u32::from_le_bytes(e[20..24].try_into().unwrap()),
            )
        })
        .collect();
    assert_eq!(
        entries,
        [(0, 0x9fc00, 1), (0x9fc00, 0x400, 2), (MIB, 15 * MIB, 1)]
    );
    assert_eq!(
        build_info(16 * MIB, &"x".repeat(5000), "P", &[], &mut out),
        Err(InfoTooLarge)
    );
}

#[test]
fn modules_are_placed_after_the_image_and_listed_with_their_strings() {
    let placed = place_modules::<4>(0x10_2345, &[10, 0x1000, 1], 16 * MIB).unwrap();
    assert_eq!(
        placed.as_slice(),
        [
            (0x10_3000, 0x10_300a),
            (0x10_4000, 0x10_5000),
            (0x10_5000, 0x10_5001)
        ]
    );
    assert_eq!(place_modules::<4>(0x10_0000, &[16 * MIB], 16 * MIB), None);
    assert_eq!(place_modules::<1>(0x10_0000, &[1, 1], 16 * MIB), None);
    let mut out = [0u8; INFO_SIZE];
    let mods = [
        InfoModule {
            start: 0x10_3000,
            end: 0x10_300a,
            string: "initrd quiet",
        },
        InfoModule {
            start: 0x10_4000,
            end: 0x10_5000,
            string: "second",
        },
    ];
    let n = build_info(16 * MIB, "k", "Parallax", &mods, &mut out).unwrap();
    let u32_at = |at: usize| u32::from_le_bytes(out[at..at + 4].try_into().unwrap());
    assert_eq!(u32_at(0) & (1 << 3), 1 << 3, "the modules flag");
    assert_eq!(u32_at(20), 2);
    let at = |gpa: u32| (gpa as u64 - INFO_GPA) as usize;
    let list = at(u32_at(24));
    let entry = |i: usize| {
        (
            u32_at(list + 16 * i),
            u32_at(list + 16 * i + 4),
            at(u32_at(list + 16 * i + 8)),
        )
    };
    let (start, end, string) = entry(0);
    assert_eq!((start, end), (0x10_3000, 0x10_300a));
    assert_eq!(&out[string..string + 13], b"initrd quiet\0");
    let (_, _, string) = entry(1);
    assert_eq!(&out[string..string + 7], b"second\0");
    assert!(string + 7 <= n);
}

proptest! {
    #[test]
    fn arbitrary_images_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096), at in 0usize..4000) {
        let mut img = bytes;
        // Plant a valid header prefix at a random place so the parsers run deep.
        if img.len() >= at + 12 {
            let a = at & !3;
            let flags = FLAG_ADDRESSES | FLAG_MEMORY_INFO;
            img[a..a + 4].copy_from_slice(&HEADER_MAGIC.to_le_bytes());
            img[a + 4..a + 8].copy_from_slice(&flags.to_le_bytes());
            img[a + 8..a + 12].copy_from_slice(&0u32.wrapping_sub(HEADER_MAGIC.wrapping_add(flags)).to_le_bytes());
        }
        let _ = plan(&img, &layout());
        if img.len() > 8 {
            img[0..4].copy_from_slice(b"\x7fELF");
            let _ = plan(&img, &layout());
        }
    }
}

/// A multiboot2 header at 0x40 of a 0x2000-byte file: its tags (type,
/// flags, body words) between the fixed part and the end tag.
fn mb2_image(arch: u32, tags: &[(u16, u16, StdVec<u32>)]) -> StdVec<u8> {
    let mut hdr: StdVec<u8> = StdVec::new();
    for (kind, flags, body) in tags {
        let size = 8 + 4 * body.len();
        hdr.extend_from_slice(&kind.to_le_bytes());
        hdr.extend_from_slice(&flags.to_le_bytes());
        hdr.extend_from_slice(&(size as u32).to_le_bytes());
        for w in body {
            hdr.extend_from_slice(&w.to_le_bytes());
        }
        while !hdr.len().is_multiple_of(8) {
            hdr.push(0);
        }
    }
    hdr.extend_from_slice(&[0, 0, 0, 0, 8, 0, 0, 0]);
    let len = 16 + hdr.len() as u32;
    let sum = mb2::HEADER_MAGIC.wrapping_add(arch).wrapping_add(len);
    let mut img = vec![0u8; 0x2000];
    for (i, w) in [mb2::HEADER_MAGIC, arch, len, 0u32.wrapping_sub(sum)]
        .iter()
        .enumerate()
    {
        img[0x40 + 4 * i..0x44 + 4 * i].copy_from_slice(&w.to_le_bytes());
    }
    img[0x50..0x50 + hdr.len()].copy_from_slice(&hdr);
    img
}

/// Address and entry tags as hello-mb2.S has them: the file from 0 loaded
/// at 1 MiB.
fn mb2_address_tags() -> StdVec<(u16, u16, StdVec<u32>)> {
    vec![
        (2, 0, vec![0x10_0040, 0x10_0000, 0x10_1800, 0x10_4000]),
        (3, 0, vec![0x10_0100]),
    ]
}

#[test]
fn a_multiboot2_header_with_address_tags_gives_the_plan() {
    let p = plan(&mb2_image(0, &mb2_address_tags()), &layout()).unwrap();
    assert_eq!(p.format, Format::Multiboot2);
    assert_eq!(p.entry, 0x10_0100);
    assert_eq!(
        p.segments.as_slice(),
        &[Segment {
            file_offset: 0,
            file_len: 0x1800,
            gpa: 0x10_0000,
            mem_len: 0x4000
        }]
    );
    // Tags the loader may ignore: console flags without a required
    // console, module alignment, relocatable, EFI entries, an optional
    // framebuffer, an information request for what it gives.
    let mut tags = mb2_address_tags();
    tags.extend([
        (4, 0, vec![2]),
        (6, 0, vec![]),
        (10, 0, vec![0x10_0000, 0xffff_ffff, 4096, 0]),
        (8, 0, vec![0x10_0200]),
        (5, 1, vec![1024, 768, 32]),
        (1, 0, vec![1, 3, 6]),
        (1, 1, vec![8, 12]),
    ]);
    assert_eq!(
        plan(&mb2_image(0, &tags), &layout()).unwrap().entry,
        0x10_0100
    );
}

#[test]
fn multiboot2_headers_asking_for_what_the_loader_lacks_are_refused_by_tag() {
    let with = |extra: (u16, u16, StdVec<u32>)| {
        let mut tags = mb2_address_tags();
        tags.push(extra);
        plan(&mb2_image(0, &tags), &layout())
    };
    assert_eq!(
        with((5, 0, vec![1024, 768, 32])),
        Err(ImageError::Mb2Unsupported(5))
    );
    assert_eq!(with((7, 0, vec![])), Err(ImageError::Mb2Unsupported(7)));
    assert_eq!(with((4, 0, vec![1])), Err(ImageError::Mb2Unsupported(4)));
    // A framebuffer's information (8) required.
    assert_eq!(with((1, 0, vec![1, 8])), Err(ImageError::Mb2Unsupported(1)));
    assert_eq!(with((77, 0, vec![])), Err(ImageError::Mb2Unsupported(77)));
    assert_eq!(
        plan(&mb2_image(4, &mb2_address_tags()), &layout()),
        Err(ImageError::Mb2Architecture(4))
    );
    // An address tag without an entry tag: nowhere to enter.
    assert_eq!(
        plan(&mb2_image(0, &mb2_address_tags()[..1]), &layout()),
        Err(ImageError::BadAddresses)
    );
    // A tag whose size runs past the header's length.
    let mut img = mb2_image(0, &mb2_address_tags());
    img[0x54..0x58].copy_from_slice(&0x400u32.to_le_bytes());
    assert_eq!(plan(&img, &layout()), Err(ImageError::Mb2BadTags));
    // A wrong checksum is no header at all, but the magic is seen.
    let mut img = mb2_image(0, &mb2_address_tags());
    img[0x4c] ^= 1;
    assert_eq!(plan(&img, &layout()), Err(ImageError::NoHeader));
    assert!(mb2::has_magic(&img));
}

#[test]
fn a_multiboot2_elf_loads_its_segments_and_may_name_its_entry() {
    // The ELF helper's multiboot header replaced by a multiboot2 one.
    let mut img = elf(true, 0x20_0000, 0x800, 0x3000);
    img[0x1000..0x100c].fill(0);
    let mb2 = mb2_image(0, &[(3, 0, vec![0x20_0100])]);
    img[0x1000..0x1040].copy_from_slice(&mb2[0x40..0x80]);
    let p = plan(&img, &layout()).unwrap();
    assert_eq!((p.format, p.entry), (Format::Multiboot2, 0x20_0100));
    assert_eq!(p.segments[0].gpa, 0x20_0000);
    let mb2 = mb2_image(0, &[]);
    img[0x1000..0x1040].copy_from_slice(&mb2[0x40..0x80]);
    assert_eq!(plan(&img, &layout()).unwrap().entry, 0x10_0010);
}

/// The tags of a multiboot2 information block: (type, body).
fn mb2_tags(info: &[u8]) -> StdVec<(u32, StdVec<u8>)> {
    let total = u32::from_le_bytes(info[0..4].try_into().unwrap()) as usize;
    let mut at = 8;
    let mut out = StdVec::new();
    while at < total {
        let kind = u32::from_le_bytes(info[at..at + 4].try_into().unwrap());
        let size = u32::from_le_bytes(info[at + 4..at + 8].try_into().unwrap()) as usize;
        out.push((kind, info[at + 8..at + size].to_vec()));
        if kind == 0 {
            break;
        }
        at = (at + size).next_multiple_of(8);
    }
    assert_eq!(at + 8, total, "the end tag closes the block");
    out
}

#[test]
fn the_multiboot2_information_lists_cmdline_modules_and_memory() {
    let mut out = [0u8; INFO_SIZE];
    let mods = [
        InfoModule {
            start: 0x20_0000,
            end: 0x20_0010,
            string: "a.txt x",
        },
        InfoModule {
            start: 0x20_1000,
            end: 0x20_1001,
            string: "",
        },
    ];
    let mut tables = [0u8; acpi::TABLES_LEN];
    acpi::build(&mut tables);
    let n = mb2::build_info(
        32 * MIB,
        "console=ttyS0",
        "Parallax",
        &mods,
        Some(acpi::rsdp(&tables)),
        &mut out,
    )
    .unwrap();
    let tags = mb2_tags(&out[..n]);
    let kinds: StdVec<u32> = tags.iter().map(|t| t.0).collect();
    assert_eq!(kinds, [1, 2, 3, 3, 4, 6, 14, 15, 0]);
    assert_eq!(tags[6].1, acpi::rsdp(&tables)[..20]);
    assert_eq!(tags[7].1, acpi::rsdp(&tables));
    assert_eq!(tags[0].1, b"console=ttyS0\0");
    assert_eq!(tags[1].1, b"Parallax\0");
    assert_eq!(&tags[2].1[..8], &[0, 0, 0x20, 0, 0x10, 0, 0x20, 0]);
    assert_eq!(&tags[2].1[8..], b"a.txt x\0");
    assert_eq!(&tags[3].1[8..], b"\0");
    assert_eq!(
        tags[4].1,
        [639u32.to_le_bytes(), (31 * 1024u32).to_le_bytes()].concat()
    );
    let mmap = &tags[5].1;
    assert_eq!(&mmap[0..8], &[24, 0, 0, 0, 0, 0, 0, 0]);
    let entry = |i: usize| {
        let e = &mmap[8 + 24 * i..8 + 24 * (i + 1)];
        (
            u64::from_le_bytes(e[0..8].try_into().unwrap()),
            u64::from_le_bytes(e[8..16].try_into().unwrap()),
            u32::from_le_bytes(e[16..20].try_into().unwrap()),
        )
    };
    assert_eq!(entry(2), (MIB, 31 * MIB, 1));
    assert_eq!(
        mb2::build_info(32 * MIB, &"x".repeat(4000), "P", &mods, None, &mut out),
        Err(InfoTooLarge)
    );
}

/// A 64-bit ELF with one PT_LOAD at 16 MiB (entry point a high virtual
/// address, as vmlinux has) and a PT_NOTE holding `notes`.
fn pvh_elf(notes: &[u8]) -> StdVec<u8> {
    let mut img = vec![0u8; 0x3000];
    img[0..4].copy_from_slice(b"\x7fELF");
    img[4] = 2;
    img[5] = 1;
    img[24..32].copy_from_slice(&0xffff_ffff_8100_0000u64.to_le_bytes());
    img[32..40].copy_from_slice(&64u64.to_le_bytes());
    img[54..56].copy_from_slice(&56u16.to_le_bytes());
    img[56..58].copy_from_slice(&2u16.to_le_bytes());
    let phdr = |img: &mut [u8], ph: usize, kind: u32, off: u64, paddr: u64, len: u64| {
        img[ph..ph + 4].copy_from_slice(&kind.to_le_bytes());
        img[ph + 8..ph + 16].copy_from_slice(&off.to_le_bytes());
        img[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes());
        img[ph + 32..ph + 40].copy_from_slice(&len.to_le_bytes());
        img[ph + 40..ph + 48].copy_from_slice(&len.to_le_bytes());
    };
    phdr(&mut img, 64, 1, 0x1000, 16 * MIB, 0x1000);
    phdr(&mut img, 120, 4, 0x800, 0, notes.len() as u64);
    img[0x800..0x800 + notes.len()].copy_from_slice(notes);
    img
}

fn note(name: &[u8], kind: u32, desc: &[u8]) -> StdVec<u8> {
    let mut n = StdVec::new();
    n.extend_from_slice(&(name.len() as u32).to_le_bytes());
    n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
    n.extend_from_slice(&kind.to_le_bytes());
    n.extend_from_slice(name);
    while !n.len().is_multiple_of(4) {
        n.push(0);
    }
    n.extend_from_slice(desc);
    while !n.len().is_multiple_of(4) {
        n.push(0);
    }
    n
}

#[test]
fn an_elf_with_a_pvh_note_enters_at_the_note() {
    let notes = [
        note(b"GNU\0", 3, &[1, 2, 3, 4, 5]),
        note(b"Xen\0", 5, b"xen-3.0\0"),
        note(
            b"Xen\0",
            pvh::NOTE_PHYS32_ENTRY,
            &0x100_0200u32.to_le_bytes(),
        ),
    ]
    .concat();
    let p = plan(&pvh_elf(&notes), &GuestLayout::new(32 * MIB)).unwrap();
    assert_eq!((p.format, p.entry), (Format::Pvh, 0x100_0200));
    assert_eq!(p.segments[0].gpa, 16 * MIB);
    // An 8-byte descriptor is taken when the address fits in 32 bits.
    let n8 = note(b"Xen\0", 18, &0x100_0300u64.to_le_bytes());
    assert_eq!(
        plan(&pvh_elf(&n8), &GuestLayout::new(32 * MIB))
            .unwrap()
            .entry,
        0x100_0300
    );
    let far = note(b"Xen\0", 18, &(1u64 << 40).to_le_bytes());
    assert_eq!(
        plan(&pvh_elf(&far), &GuestLayout::new(32 * MIB)),
        Err(ImageError::PvhBadNote)
    );
    let short = note(b"Xen\0", 18, &[1, 2]);
    assert_eq!(
        plan(&pvh_elf(&short), &GuestLayout::new(32 * MIB)),
        Err(ImageError::PvhBadNote)
    );
    // No note (or another owner's type 18): no kernel Parallax can load.
    let other = note(b"Linux\0", 18, &[0; 4]);
    assert_eq!(
        plan(&pvh_elf(&other), &GuestLayout::new(32 * MIB)),
        Err(ImageError::NoHeader)
    );
    // A note whose sizes run past its segment.
    let mut bad = note(b"Xen\0", 18, &[0; 4]);
    bad[4] = 0x40;
    assert_eq!(
        plan(&pvh_elf(&bad), &GuestLayout::new(32 * MIB)),
        Err(ImageError::BadElf)
    );
    // 16 MiB of RAM cannot take a kernel loaded at 16 MiB.
    assert_eq!(
        plan(&pvh_elf(&notes), &GuestLayout::new(16 * MIB)),
        Err(ImageError::OutsideRam {
            start: 16 * MIB,
            end: 16 * MIB + 0x1000
        })
    );
}

#[test]
fn the_pvh_start_info_points_at_modules_memory_map_and_cmdline() {
    let mut out = [0u8; INFO_SIZE];
    let mods = [InfoModule {
        start: 0x200_0000,
        end: 0x200_0123,
        string: "",
    }];
    let n = pvh::build_start_info(
        INFO_GPA,
        32 * MIB,
        "root=/dev/ram0",
        &mods,
        0xe_0000,
        &mut out,
    )
    .unwrap();
    let u32_ = |at: usize| u32::from_le_bytes(out[at..at + 4].try_into().unwrap());
    let u64_ = |at: usize| u64::from_le_bytes(out[at..at + 8].try_into().unwrap());
    let local = |gpa: u64| (gpa - INFO_GPA) as usize;
    assert_eq!((u32_(0), u32_(4), u32_(12)), (pvh::START_MAGIC, 1, 1));
    let modlist = local(u64_(16));
    assert_eq!(
        (u64_(modlist), u64_(modlist + 8), u64_(modlist + 16)),
        (0x200_0000, 0x123, 0)
    );
    let cmdline = local(u64_(24));
    assert_eq!(&out[cmdline..cmdline + 15], b"root=/dev/ram0\0");
    assert_eq!(u64_(32), 0xe_0000);
    let memmap = local(u64_(40));
    assert_eq!(u32_(48), 3);
    assert_eq!(
        (u64_(memmap + 48), u64_(memmap + 56), u32_(memmap + 64)),
        (MIB, 31 * MIB, 1)
    );
    assert!(cmdline + 15 <= n);
    // A module with a command line gets its string.
    let named = [InfoModule {
        string: "initrd.img quiet",
        ..mods[0]
    }];
    let mut out = [0u8; INFO_SIZE];
    pvh::build_start_info(INFO_GPA, 32 * MIB, "", &named, 0, &mut out).unwrap();
    let u64_ = |at: usize| u64::from_le_bytes(out[at..at + 8].try_into().unwrap());
    let s = local(u64_(local(u64_(16)) + 16));
    assert_eq!(&out[s..s + 17], b"initrd.img quiet\0");
}

proptest! {
    #[test]
    fn arbitrary_multiboot2_tags_and_notes_never_panic(
        tags in proptest::collection::vec(any::<u8>(), 0..512),
        notes in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut img = mb2_image(0, &[]);
        img[0x48..0x4c].copy_from_slice(&(16 + tags.len() as u32).to_le_bytes());
        let sum = mb2::HEADER_MAGIC.wrapping_add(16 + tags.len() as u32);
        img[0x4c..0x50].copy_from_slice(&0u32.wrapping_sub(sum).to_le_bytes());
        img[0x50..0x50 + tags.len()].copy_from_slice(&tags);
        let _ = plan(&img, &layout());
        let _ = plan(&pvh_elf(&notes), &layout());
    }
}

/// Guest memory holding the tables where they go, for the host's own
/// ACPI walker.
struct GuestTables(StdVec<u8>);

impl crate::acpi::PhysMemory for GuestTables {
    fn read(&self, addr: u64, len: usize) -> Option<&[u8]> {
        let at = addr.checked_sub(acpi::TABLES_GPA)? as usize;
        self.0.get(at..at.checked_add(len)?)
    }
}

#[test]
fn the_guest_acpi_tables_walk_and_describe_a_power_off_and_the_apic() {
    use crate::acpi::{RootTable, Rsdp};
    let mut tables = [0u8; acpi::TABLES_LEN];
    acpi::build(&mut tables);
    let rsdp = Rsdp::parse(acpi::rsdp(&tables)).unwrap();
    assert_eq!(rsdp.revision, 2);
    let mem = GuestTables(tables.to_vec());
    // Through the XSDT and through the RSDT (an ACPI 1.0 kernel's way).
    for rsdp in [rsdp, Rsdp { xsdt: None, ..rsdp }] {
        let root = RootTable::read(&mem, &rsdp).unwrap();
        let found: StdVec<_> = root.tables(&mem).map(|t| t.unwrap()).collect();
        assert_eq!(found.len(), 2);
        let fadt = found[0];
        let madt = found[1];
        assert_eq!(&madt.signature(), b"APIC");
        let m = madt.bytes;
        // The local APIC at 0xfee00000, PCAT_COMPAT, one enabled processor
        // local APIC (type 0, length 8, processor 0, APIC ID 0, flags 1).
        assert_eq!(&m[36..44], &[0, 0, 0xe0, 0xfe, 1, 0, 0, 0]);
        assert_eq!(&m[44..52], &[0, 8, 0, 0, 1, 0, 0, 0]);
        // The I/O APIC (type 1, length 12, ID 0, at 0xfec00000, GSI base
        // 0), then QEMU's overrides: ISA IRQ 0 on GSI 2 (conforming flags),
        // IRQ 9 on GSI 9, level, active high (flags 0x000d).
        assert_eq!(&m[52..64], &[1, 12, 0, 0, 0, 0, 0xc0, 0xfe, 0, 0, 0, 0]);
        assert_eq!(&m[64..74], &[2, 10, 0, 0, 2, 0, 0, 0, 0, 0]);
        assert_eq!(&m[74..84], &[2, 10, 0, 9, 9, 0, 0, 0, 0x0d, 0]);
        assert_eq!(m.len(), 84);
        assert_eq!(&fadt.signature(), b"FACP");
        let b = fadt.bytes;
        let u32_ = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
        assert_eq!(u32_(64), u32::from(acpi::PM1A_CNT));
        assert_eq!(u32_(48), 0, "no SMI command port: ACPI mode is on");
        // X_PM1a_CNT_BLK: system I/O, 16 bits, at 0x604.
        assert_eq!(&b[172..176], &[1, 16, 0, 2]);
        let dsdt = crate::acpi::read_table(&mem, u64::from(u32_(40)), Some(*b"DSDT")).unwrap();
        assert!(dsdt.body().windows(4).any(|w| w == b"_S5_"));
        let facs = crate::acpi::PhysMemory::read(&mem, u64::from(u32_(36)), 64).unwrap();
        assert_eq!(&facs[..4], b"FACS");
        assert_eq!(u32_(36) % 64, 0, "the FACS is 64-byte aligned");
    }
    assert!(acpi::TABLES_GPA + acpi::TABLES_LEN as u64 <= 0xa_0000);
}

#[test]
fn the_rom_area_is_in_the_hole_and_not_ram_in_the_memory_map() {
    let l = layout();
    assert_eq!(l.rom, (0xc_0000, 0x10_0000));
    assert!(
        l.hole.0 <= l.rom.0 && l.rom.1 <= l.hole.1,
        "inside the hole"
    );
    for (start, bytes, kind) in memory_map(l.ram_bytes) {
        let overlaps = start < l.rom.1 && l.rom.0 < start + bytes;
        assert!(
            !(overlaps && kind == 1),
            "the memory map gives no RAM there"
        );
    }
}

/// A synthetic bzImage: boot protocol `version`, two setup sectors, a
/// protected-mode part of `kernel_len` bytes (its first byte 0xbb),
/// `LOADED_HIGH`, code32_start 1 MiB, init_size `init_size`, relocatable
/// with `pref` as its preferred address (0: not relocatable).
fn bzimage(version: u16, kernel_len: usize, init_size: u32, pref: u64) -> StdVec<u8> {
    use linux::at;
    let setup = 3 * 512;
    let mut img = vec![0u8; setup + kernel_len];
    img[at::SETUP_SECTS] = 2;
    img[at::BOOT_FLAG..at::BOOT_FLAG + 2].copy_from_slice(&0xaa55u16.to_le_bytes());
    img[at::JUMP] = 0xeb;
    img[at::JUMP + 1] = 0x6a; // the header runs to 0x26c
    img[linux::MAGIC_AT..linux::MAGIC_AT + 4].copy_from_slice(linux::MAGIC);
    img[at::VERSION..at::VERSION + 2].copy_from_slice(&version.to_le_bytes());
    img[0x1f4..0x1f8].copy_from_slice(&(kernel_len as u32 / 16).to_le_bytes());
    img[at::LOADFLAGS] = linux::LOADED_HIGH | 0x80;
    let put32 = |img: &mut StdVec<u8>, o: usize, v: u32| {
        img[o..o + 4].copy_from_slice(&v.to_le_bytes());
    };
    put32(&mut img, at::CODE32_START, 0x10_0000);
    put32(&mut img, at::INITRD_ADDR_MAX, 0x37ff_ffff);
    put32(&mut img, at::KERNEL_ALIGNMENT, 0x20_0000);
    img[at::RELOCATABLE_KERNEL] = u8::from(pref != 0);
    put32(&mut img, at::CMDLINE_SIZE, 2047);
    img[at::PREF_ADDRESS..at::PREF_ADDRESS + 8].copy_from_slice(&pref.to_le_bytes());
    put32(&mut img, at::INIT_SIZE, init_size);
    img[setup] = 0xbb;
    img
}

#[test]
fn a_bzimage_loads_its_protected_mode_kernel_at_1_mib() {
    let img = bzimage(0x020f, 0x3000, 0x8000, 0);
    let p = plan(&img, &layout()).unwrap();
    assert_eq!((p.format, p.entry), (Format::Linux, 0x10_0000));
    assert_eq!(
        p.segments.as_slice(),
        &[Segment {
            file_offset: 3 * 512,
            file_len: 0x3000,
            gpa: 0x10_0000,
            mem_len: 0x8000, // init_size: modules go after it
        }]
    );
    let h = linux::header(&img).unwrap();
    assert_eq!(
        (h.version, h.setup_len, h.cmdline_size),
        (0x020f, 0x600, 2047)
    );
    // setup_sects 0 means 4.
    let mut four = bzimage(0x020f, 0x3000, 0, 0);
    four[linux::at::SETUP_SECTS] = 0;
    four.splice(0x600..0x600, [0u8; 0x400]);
    let p = plan(&four, &layout()).unwrap();
    assert_eq!(p.segments[0].file_offset, 5 * 512);
    assert_eq!(
        p.segments[0].mem_len, 0x3000,
        "no init_size: the kernel's length"
    );
}

#[test]
fn a_relocatable_bzimage_goes_to_its_preferred_address_where_it_fits() {
    let img = bzimage(0x020f, 0x3000, 0x40_0000, 0x80_0000);
    let p = plan(&img, &layout()).unwrap();
    assert_eq!((p.segments[0].gpa, p.entry), (0x80_0000, 0x80_0000));
    // 8 MiB + 4 MiB does not fit in 10 MiB: at 1 MiB instead.
    let p = plan(&img, &GuestLayout::new(10 * MIB)).unwrap();
    assert_eq!((p.segments[0].gpa, p.entry), (0x10_0000, 0x10_0000));
    // A preferred address off the kernel's alignment is not taken.
    let odd = bzimage(0x020f, 0x3000, 0x40_0000, 0x81_0000);
    assert_eq!(plan(&odd, &layout()).unwrap().segments[0].gpa, 0x10_0000);
}

#[test]
fn bzimages_the_loader_cannot_take_are_refused_saying_why() {
    assert_eq!(
        plan(&bzimage(0x0205, 0x3000, 0, 0), &layout()),
        Err(ImageError::LinuxProtocol(0x0205))
    );
    let mut zimage = bzimage(0x020f, 0x3000, 0, 0);
    zimage[linux::at::LOADFLAGS] = 0;
    assert_eq!(
        plan(&zimage, &layout()),
        Err(ImageError::LinuxNotLoadedHigh)
    );
    let whole = bzimage(0x020f, 0x3000, 0, 0);
    for cut in [0x210, 0x263, 0x600, 0x600 + 0x2ff0] {
        assert_eq!(
            plan(&whole[..cut], &layout()),
            Err(ImageError::LinuxTruncated),
            "cut at {cut:#x}"
        );
    }
    // A 2.06 header ends at cmdline_size: 0x23c bytes are enough to read it.
    let old = bzimage(0x0206, 0x3000, 0, 0);
    assert!(linux::header(&old[..0x23c]).is_err_and(|e| e == ImageError::LinuxTruncated));
    assert_eq!(linux::header(&old).unwrap().init_size, 0x3000);
    // 15 MiB of init_size from 1 MiB: more than 16 MiB of RAM.
    assert_eq!(
        plan(&bzimage(0x020f, 0x3000, 15 * 0x10_0000 + 1, 0), &layout()),
        Err(ImageError::OutsideRam {
            start: 0x10_0000,
            end: 0x100_0001
        })
    );
    let mut empty = bzimage(0x020f, 0x3000, 0, 0);
    empty[0x1f4..0x1f8].fill(0);
    assert_eq!(plan(&empty, &layout()), Err(ImageError::Empty));
}

#[test]
fn boot_params_hold_the_header_memory_map_command_line_and_initrd() {
    use linux::at;
    let img = bzimage(0x020f, 0x3000, 0x8000, 0);
    let p = plan(&img, &layout()).unwrap();
    let place = linux::Placement::at(0x1000);
    let mut bp = [0u8; linux::BOOT_PARAMS_LEN];
    let params = |cmdline, initrd| linux::Params {
        ram_bytes: 16 * MIB,
        place,
        cmdline,
        initrd,
        rsdp: 0x9_fc00,
    };
    linux::build_boot_params(
        &img,
        &p,
        &params("console=ttyS0", Some((0x20_0000, 0x20_1234))),
        &mut bp,
    )
    .unwrap();
    let u32_ = |o: usize| u32::from_le_bytes(bp[o..o + 4].try_into().unwrap());
    let u64_ = |o: usize| u64::from_le_bytes(bp[o..o + 8].try_into().unwrap());
    assert_eq!(&bp[linux::MAGIC_AT..linux::MAGIC_AT + 4], b"HdrS");
    assert_eq!(bp[at::SETUP_SECTS], 2);
    assert_eq!(
        u32_(at::KERNEL_ALIGNMENT),
        0x20_0000,
        "copied from the file"
    );
    assert_eq!(u32_(at::INIT_SIZE), 0x8000);
    assert_eq!(bp[at::TYPE_OF_LOADER], 0xff);
    assert_eq!(
        bp[at::LOADFLAGS],
        linux::LOADED_HIGH,
        "no heap: no setup code runs"
    );
    assert_eq!(u32_(at::CODE32_START), 0x10_0000);
    assert_eq!(u32_(at::CMD_LINE_PTR), 0x2100);
    assert_eq!(
        (u32_(at::RAMDISK_IMAGE), u32_(at::RAMDISK_SIZE)),
        (0x20_0000, 0x1234)
    );
    assert_eq!(bp[at::E820_ENTRIES], 3);
    let e820: StdVec<(u64, u64, u32)> = (0..3)
        .map(|i| {
            let o = at::E820_TABLE + 20 * i;
            (u64_(o), u64_(o + 8), u32_(o + 16))
        })
        .collect();
    assert_eq!(
        e820,
        memory_map(16 * MIB),
        "the same map as the other formats"
    );
    assert_eq!(u32_(at::ALT_MEM_K), 15 * 1024);
    assert_eq!(u64_(at::ACPI_RSDP_ADDR), 0x9_fc00);
    // Before 2.14 the field is not the kernel's to read.
    let old = bzimage(0x020d, 0x3000, 0x8000, 0);
    let p = plan(&old, &layout()).unwrap();
    let mut bp = [0u8; linux::BOOT_PARAMS_LEN];
    linux::build_boot_params(&old, &p, &params("", None), &mut bp).unwrap();
    assert_eq!(&bp[at::ACPI_RSDP_ADDR..at::ACPI_RSDP_ADDR + 8], &[0; 8]);
    assert_eq!(&bp[at::RAMDISK_IMAGE..at::RAMDISK_IMAGE + 8], &[0; 8]);
}

#[test]
fn boot_params_refuse_a_long_command_line_and_a_high_initrd() {
    let mut img = bzimage(0x020f, 0x3000, 0x8000, 0);
    img[linux::at::CMDLINE_SIZE..linux::at::CMDLINE_SIZE + 4].copy_from_slice(&4u32.to_le_bytes());
    img[linux::at::INITRD_ADDR_MAX..linux::at::INITRD_ADDR_MAX + 4]
        .copy_from_slice(&0x1f_ffffu32.to_le_bytes());
    let p = plan(&img, &layout()).unwrap();
    let place = linux::Placement::at(0x1000);
    let mut bp = [0u8; linux::BOOT_PARAMS_LEN];
    let mut build = |cmdline: &str, initrd| {
        let params = linux::Params {
            ram_bytes: 16 * MIB,
            place,
            cmdline,
            initrd,
            rsdp: 0,
        };
        linux::build_boot_params(&img, &p, &params, &mut bp)
    };
    assert_eq!(
        build("quiet", None),
        Err(linux::ParamsError::CmdlineTooLong { len: 5, max: 4 })
    );
    assert_eq!(build("ro", Some((0x1f_f000, 0x20_0000))), Ok(()));
    assert_eq!(
        build("ro", Some((0x1f_f000, 0x20_0001))),
        Err(linux::ParamsError::InitrdTooHigh {
            end: 0x20_0001,
            max: 0x1f_ffff
        })
    );
}

#[test]
fn the_trampoline_loads_the_boot_gdt_and_enters_with_esi_at_boot_params() {
    let place = linux::Placement::at(0x1000);
    let t = linux::trampoline(&place, 0x10_0200);
    let u64_ = |o: usize| u64::from_le_bytes(t[o..o + 8].try_into().unwrap());
    assert_eq!(u64_(0), 0);
    assert_eq!(u64_(0x10), 0x00cf_9a00_0000_ffff, "__BOOT_CS: flat code");
    assert_eq!(u64_(0x18), 0x00cf_9200_0000_ffff, "__BOOT_DS: flat data");
    assert_eq!(
        &t[0x20..0x26],
        &[0x1f, 0, 0x00, 0x20, 0, 0],
        "the GDT at 0x2000"
    );
    let code = &t[linux::TRAMPOLINE_ENTRY as usize..];
    assert_eq!(
        &code[..7],
        &[0x0f, 0x01, 0x15, 0x20, 0x20, 0, 0],
        "lgdt [0x2020]"
    );
    let esi = code.windows(5).position(|w| w == [0xbe, 0x00, 0x10, 0, 0]);
    assert!(esi.is_some(), "mov esi, 0x1000");
    let far = code
        .windows(7)
        .position(|w| w == [0xea, 0x00, 0x02, 0x10, 0, 0x10, 0]);
    assert!(far.is_some(), "jmp far 0x10:0x100200");
    assert!(far > esi, "the jump comes last");
}

proptest! {
    #[test]
    fn arbitrary_setup_headers_never_panic(
        header in proptest::collection::vec(any::<u8>(), 0x70..0x90),
        len in 0usize..0x2000,
    ) {
        let mut img = bzimage(0x020f, 0x1000, 0x2000, 0);
        img[0x1f1..0x1f1 + header.len()].copy_from_slice(&header);
        img[linux::MAGIC_AT..linux::MAGIC_AT + 4].copy_from_slice(linux::MAGIC);
        img.truncate(len.max(0x206));
        if let Ok(p) = plan(&img, &layout()) {
            let mut bp = [0u8; linux::BOOT_PARAMS_LEN];
            let place = linux::Placement::at(0x1000);
            let params = linux::Params { ram_bytes: 16 * MIB, place, cmdline: "x", initrd: Some((0x20_0000, 0x20_1000)), rsdp: 0 };
            let _ = linux::build_boot_params(&img, &p, &params, &mut bp);
        }
    }
}
