//! The MMIO instruction decoder against a table of encodings (as GNU as
//! assembles them) and properties over arbitrary bytes.

extern crate std;

use crate::decode::{DecodeError, Insn, Mode, Op, Reg, decode, load_into, read_reg};
use proptest::prelude::*;

const fn r(index: u8) -> Reg {
    Reg {
        index,
        high8: false,
    }
}

fn load(reg: Reg, size: u8, dest: u8, sign: bool, len: u8) -> Insn {
    Insn {
        op: Op::Load { reg, dest, sign },
        size,
        len,
    }
}

fn store(reg: Reg, size: u8, len: u8) -> Insn {
    Insn {
        op: Op::StoreReg { reg },
        size,
        len,
    }
}

fn imm(value: u64, size: u8, len: u8) -> Insn {
    Insn {
        op: Op::StoreImm { value },
        size,
        len,
    }
}

#[test]
fn encodings_as_the_assembler_makes_them() {
    use Mode::*;
    let ah = Reg {
        index: 0,
        high8: true,
    };
    let table: &[(&[u8], Mode, Insn)] = &[
        // mov (%ebx),%eax
        (&[0x8b, 0x03], Protected32, load(r(0), 4, 4, false, 2)),
        // mov 0x10(%ebx),%ecx
        (&[0x8b, 0x4b, 0x10], Protected32, load(r(1), 4, 4, false, 3)),
        // mov %eax,0xfec00000
        (
            &[0x89, 0x05, 0x00, 0x00, 0xc0, 0xfe],
            Protected32,
            store(r(0), 4, 6),
        ),
        // mov 0xb0100000,%eax ; mov %al,0xb0100000 ; movabs 0x...,%rax
        (
            &[0xa1, 0x00, 0x00, 0x10, 0xb0],
            Protected32,
            load(r(0), 4, 4, false, 5),
        ),
        (
            &[0xa2, 0x00, 0x00, 0x10, 0xb0],
            Protected32,
            store(r(0), 1, 5),
        ),
        (
            &[0x48, 0xa1, 0, 0, 0x10, 0xb0, 0, 0, 0, 0],
            Long,
            load(r(0), 8, 8, false, 10),
        ),
        (
            &[0x66, 0xa3, 0, 0, 0x10, 0xb0],
            Protected32,
            store(r(0), 2, 6),
        ),
        // mov %edx,(%ebx,%ecx,4)
        (&[0x89, 0x14, 0x8b], Protected32, store(r(2), 4, 3)),
        // mov 0x12345678(,%ecx,1),%esi: SIB with no base, disp32
        (
            &[0x8b, 0x34, 0x0d, 0x78, 0x56, 0x34, 0x12],
            Protected32,
            load(r(6), 4, 4, false, 7),
        ),
        // mov 0x100(%ebp),%edi: disp32 from mod 10
        (
            &[0x8b, 0xbd, 0x00, 0x01, 0x00, 0x00],
            Protected32,
            load(r(7), 4, 4, false, 6),
        ),
        // mov (%ebx),%ah
        (&[0x8a, 0x23], Protected32, load(ah, 1, 1, false, 2)),
        // mov %bh,(%eax)
        (
            &[0x88, 0x38],
            Protected32,
            store(
                Reg {
                    index: 3,
                    high8: true,
                },
                1,
                2,
            ),
        ),
        // mov (%ebx),%ax
        (&[0x66, 0x8b, 0x03], Protected32, load(r(0), 2, 2, false, 3)),
        // movl $0x12345678,(%ebx)
        (
            &[0xc7, 0x03, 0x78, 0x56, 0x34, 0x12],
            Protected32,
            imm(0x1234_5678, 4, 6),
        ),
        // movw $0xbeef,4(%ebx)
        (
            &[0x66, 0xc7, 0x43, 0x04, 0xef, 0xbe],
            Protected32,
            imm(0xffff_ffff_ffff_beef, 2, 6),
        ),
        // movb $0x80,(%ebx)
        (
            &[0xc6, 0x03, 0x80],
            Protected32,
            imm(0xffff_ffff_ffff_ff80, 1, 3),
        ),
        // movzbl (%ebx),%eax ; movswl (%ebx),%ecx
        (&[0x0f, 0xb6, 0x03], Protected32, load(r(0), 1, 4, false, 3)),
        (&[0x0f, 0xbf, 0x0b], Protected32, load(r(1), 2, 4, true, 3)),
        // mov (%rdi),%eax ; mov (%rdi),%r9d ; mov (%r9),%rax
        (&[0x8b, 0x07], Long, load(r(0), 4, 4, false, 2)),
        (&[0x44, 0x8b, 0x0f], Long, load(r(9), 4, 4, false, 3)),
        (&[0x49, 0x8b, 0x01], Long, load(r(0), 8, 8, false, 3)),
        // mov %r15,0x8(%rsp): REX.WR, SIB, disp8
        (&[0x4c, 0x89, 0x7c, 0x24, 0x08], Long, store(r(15), 8, 5)),
        // mov 0x1000(%rip),%eax
        (
            &[0x8b, 0x05, 0x00, 0x10, 0x00, 0x00],
            Long,
            load(r(0), 4, 4, false, 6),
        ),
        // mov (%rax),%sil: REX makes 6 SIL, not DH
        (&[0x40, 0x8a, 0x30], Long, load(r(6), 1, 1, false, 3)),
        // movq $-1,(%rax): imm32 sign-extended
        (
            &[0x48, 0xc7, 0x00, 0xff, 0xff, 0xff, 0xff],
            Long,
            imm(u64::MAX, 8, 7),
        ),
        // movzwl %fs:(%rax),%edx
        (&[0x64, 0x0f, 0xb7, 0x10], Long, load(r(2), 2, 4, false, 4)),
        // movsbq (%rax),%rcx
        (&[0x48, 0x0f, 0xbe, 0x08], Long, load(r(1), 1, 8, true, 4)),
        // a 16-bit segment: mov (%ebx),%ax needs 67
        (&[0x67, 0x8b, 0x03], Protected16, load(r(0), 2, 2, false, 3)),
        (
            &[0x66, 0x67, 0x8b, 0x03],
            Protected16,
            load(r(0), 4, 4, false, 4),
        ),
    ];
    for (bytes, mode, want) in table {
        assert_eq!(decode(bytes, *mode), Ok(*want), "{bytes:02x?} in {mode:?}");
    }
}

#[test]
fn what_is_not_emulated_is_refused_naming_why() {
    use Mode::*;
    let table: &[(&[u8], Mode, DecodeError)] = &[
        (&[0x01, 0x03], Protected32, DecodeError::Opcode(0x01)),
        (&[0xa5], Protected32, DecodeError::Opcode(0xa5)),
        (&[0xf3, 0xa5], Protected32, DecodeError::Prefix(0xf3)),
        (&[0xf0, 0x89, 0x03], Protected32, DecodeError::Prefix(0xf0)),
        (&[0x0f, 0x0b], Protected32, DecodeError::Opcode(0x0f0b)),
        (&[0x89, 0xc3], Protected32, DecodeError::RegisterOperand),
        (
            &[0xc7, 0x0b, 0, 0, 0, 0],
            Protected32,
            DecodeError::Extension(1),
        ),
        (&[0x8b, 0x07], Protected16, DecodeError::Addressing16),
        (&[0x67, 0x8b, 0x07], Protected32, DecodeError::Addressing16),
        (&[0x8b, 0x05, 0x00], Long, DecodeError::Truncated),
        (&[], Long, DecodeError::Truncated),
        (&[0x48], Long, DecodeError::Truncated),
        // In 32-bit mode 0x48 is DEC, not REX.
        (&[0x48, 0x8b, 0x03], Protected32, DecodeError::Opcode(0x48)),
    ];
    for (bytes, mode, want) in table {
        assert_eq!(decode(bytes, *mode), Err(*want), "{bytes:02x?} in {mode:?}");
    }
}

#[test]
fn loads_merge_into_the_register_as_the_cpu_does() {
    let old = 0x1122_3344_5566_7788;
    // 32-bit destinations zero the upper half.
    assert_eq!(load_into(old, 0xffff_ffff, 4, r(0), 4, false), 0xffff_ffff);
    // 8 and 16 bits keep the rest.
    assert_eq!(
        load_into(old, 0xab, 1, r(0), 1, false),
        0x1122_3344_5566_77ab
    );
    assert_eq!(
        load_into(old, 0xabcd, 2, r(0), 2, false),
        0x1122_3344_5566_abcd
    );
    // AH.
    let ah = Reg {
        index: 0,
        high8: true,
    };
    assert_eq!(load_into(old, 0xab, 1, ah, 1, false), 0x1122_3344_5566_ab88);
    assert_eq!(read_reg(&[old], ah, 1), 0x77);
    // x86's register numbers in VCPU_REGS order: RBX (3) is slot 1, RSP
    // (4) slot 7, RDI (7) slot 5, R9 itself.
    let regs: std::vec::Vec<u64> = (0..16).collect();
    assert_eq!(read_reg(&regs, r(3), 8), 1);
    assert_eq!(read_reg(&regs, r(4), 8), 7);
    assert_eq!(read_reg(&regs, r(7), 8), 5);
    assert_eq!(read_reg(&regs, r(9), 8), 9);
    // MOVZX / MOVSX.
    assert_eq!(load_into(old, 0x80, 1, r(0), 4, false), 0x80);
    assert_eq!(load_into(old, 0x80, 1, r(0), 4, true), 0xffff_ff80);
    assert_eq!(
        load_into(old, 0x8000, 2, r(0), 8, true),
        0xffff_ffff_ffff_8000
    );
    assert_eq!(load_into(old, u64::MAX, 8, r(0), 8, false), u64::MAX);
}

proptest! {
    /// Any bytes: no panic, and what decodes is no longer than the bytes
    /// and 15, has an access size of 1, 2, 4 or 8, and decodes the same
    /// with anything after it.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..20), tail in any::<u8>(), m in 0u8..3) {
        let mode = [Mode::Long, Mode::Protected32, Mode::Protected16][usize::from(m)];
        if let Ok(i) = decode(&bytes, mode) {
            prop_assert!(usize::from(i.len) <= bytes.len().min(15));
            prop_assert!(matches!(i.size, 1 | 2 | 4 | 8));
            let mut more = bytes[..usize::from(i.len)].to_vec();
            more.push(tail);
            prop_assert_eq!(decode(&more, mode), Ok(i));
        }
    }

    /// Every ModRM/SIB form of `mov (mem),%eax` and `mov %eax,(mem)` in
    /// 32-bit mode has the length the addressing form gives.
    #[test]
    fn lengths_follow_modrm_and_sib(modrm in any::<u8>(), sib in any::<u8>(), store in any::<bool>()) {
        prop_assume!(modrm >> 6 != 3);
        let bytes = [if store { 0x89 } else { 0x8b }, modrm, sib, 0, 0, 0, 0, 0];
        let (md, rm) = (modrm >> 6, modrm & 7);
        let has_sib = rm == 4;
        let disp = match md {
            0 if rm == 5 || (has_sib && sib & 7 == 5) => 4,
            1 => 1,
            2 => 4,
            _ => 0,
        };
        let want = 2 + u8::from(has_sib) + disp;
        let i = decode(&bytes, Mode::Protected32).unwrap();
        prop_assert_eq!(i.len, want);
        prop_assert_eq!(i.size, 4);
    }
}
