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
