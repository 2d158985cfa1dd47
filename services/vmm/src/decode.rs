//! The instructions a guest reaches MMIO with, decoded far enough to
//! emulate them (docs/guests.md, MMIO): the MOV loads and stores (88, 89,
//! 8A, 8B, C6 /0, C7 /0, and A0-A3 with a direct address) and MOVZX/MOVSX (0F B6, B7, BE, BF), with their
//! prefixes (operand size 66, address size 67, segment overrides, REX in
//! 64-bit mode), ModRM, SIB and displacement. The address itself is not
//! computed: the exit gives the guest-physical address the access reached.
//! Everything else (a string instruction, LOCK, REP, an ALU operation on
//! memory, 16-bit addressing) is [`DecodeError`]: the caller stops the
//! domain, naming the bytes.
//!
//! Every byte is the guest's: nothing here panics on any input.

/// The code segment the instruction runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// 64-bit mode (CS.L): REX prefixes, 64-bit addressing.
    Long,
    /// 32-bit protected mode (CS.D set) or compatibility mode.
    Protected32,
    /// A 16-bit code segment (real mode, or CS.D clear).
    Protected16,
}

/// A general register as an instruction names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reg {
    /// 0 (RAX) to 15 (R15) as x86 numbers them (RAX, RCX, RDX, RBX, RSP,
    /// RBP, RSI, RDI, R8...): [`slot`] gives its place in
    /// `ipc_schema::syscall::regs` order.
    pub index: u8,
    /// AH, CH, DH or BH: bits 8-15 of register `index` (0-3).
    pub high8: bool,
}

/// What the instruction does with the memory operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// A load of `size` bytes into `reg`, whose width is `dest` bytes;
    /// `sign`: sign-extended (MOVSX), otherwise zero-extended where
    /// `dest > size`.
    Load { reg: Reg, dest: u8, sign: bool },
    /// A store of `size` bytes of a register.
    StoreReg { reg: Reg },
    /// A store of an immediate (already sign-extended to 64 bits).
    StoreImm { value: u64 },
}

/// A decoded instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    pub op: Op,
    /// Bytes of memory accessed (1, 2, 4 or 8).
    pub size: u8,
    /// The instruction's length in bytes.
    pub len: u8,
}

/// Why the bytes are not an instruction this decoder emulates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, defmt::Format)]
pub enum DecodeError {
    /// The bytes ended (or 15 were used) before the instruction did.
    Truncated,
    /// An opcode (after prefixes, `0x0f`-escaped ones as `0x0fxx`) that is
    /// not a MOV, MOVZX or MOVSX.
    Opcode(u16),
    /// LOCK, REP or REPNE: not on these instructions.
    Prefix(u8),
    /// ModRM names a register, not memory (it cannot have reached MMIO).
    RegisterOperand,
    /// C6 or C7 with a ModRM reg field other than 0.
    Extension(u8),
    /// 16-bit addressing (a 16-bit segment or the 67 prefix outside 64-bit
    /// mode).
    Addressing16,
}

/// The longest instruction x86 has.
pub const MAX_LEN: usize = 15;

/// Decodes the instruction at the start of `bytes` (up to [`MAX_LEN`]).
pub fn decode(bytes: &[u8], mode: Mode) -> Result<Insn, DecodeError> {
    let bytes = bytes.get(..MAX_LEN).unwrap_or(bytes);
    let mut at = 0usize;
    let next = |at: &mut usize| -> Result<u8, DecodeError> {
        let b = *bytes.get(*at).ok_or(DecodeError::Truncated)?;
        *at += 1;
        Ok(b)
    };
    let (mut opsize16, mut addr_override) = (false, false);
    let mut rex = 0u8;
    let b = loop {
        let b = next(&mut at)?;
        match b {
            0x66 => opsize16 = true,
            0x67 => addr_override = true,
            0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 => {}
            0xf0 | 0xf2 | 0xf3 => return Err(DecodeError::Prefix(b)),
            0x40..=0x4f if mode == Mode::Long => {
                rex = b;
                continue;
            }
            _ => break b,
        }
        // REX counts only right before the opcode.
        rex = 0;
    };
    let addr16 = match mode {
        Mode::Long => false,
        Mode::Protected32 => addr_override,
        Mode::Protected16 => !addr_override,
    };
    if addr16 {
        return Err(DecodeError::Addressing16);
    }
    let w = rex & 8 != 0;
    let default16 = mode == Mode::Protected16;
    let wide = if w {
        8
    } else if opsize16 != default16 {
        2
    } else {
        4
    };
    // MOV between AL/eAX and a direct address (moffs): no ModRM.
    if let 0xa0..=0xa3 = b {
        let size = if b & 1 == 0 { 1 } else { wide };
        let offset = if mode == Mode::Long && !addr_override {
            8
        } else {
            4
        };
        for _ in 0..offset {
            next(&mut at)?;
        }
        let reg = Reg {
            index: 0,
            high8: false,
        };
        let op = if b & 2 == 0 {
            Op::Load {
                reg,
                dest: size,
                sign: false,
            }
        } else {
            Op::StoreReg { reg }
        };
        return Ok(Insn {
            op,
            size,
            len: at as u8,
        });
    }
    let (size, kind) = if b == 0x0f {
        let b2 = next(&mut at)?;
        match b2 {
            0xb6 | 0xbe => (1, Kind::Extend(b2 == 0xbe)),
            0xb7 | 0xbf => (2, Kind::Extend(b2 == 0xbf)),
            _ => return Err(DecodeError::Opcode(0x0f00 | u16::from(b2))),
        }
    } else {
        match b {
            0x88 => (1, Kind::Store),
            0x89 => (wide, Kind::Store),
            0x8a => (1, Kind::Load),
            0x8b => (wide, Kind::Load),
            0xc6 => (1, Kind::Imm),
            0xc7 => (wide, Kind::Imm),
            _ => return Err(DecodeError::Opcode(u16::from(b))),
        }
    };
    let modrm = next(&mut at)?;
    let (md, reg_field, rm) = (modrm >> 6, (modrm >> 3) & 7, modrm & 7);
    if md == 3 {
        return Err(DecodeError::RegisterOperand);
    }
    // SIB, then the displacement.
    let mut disp = match md {
        1 => 1,
        2 => 4,
        _ => 0,
    };
    if rm == 4 {
        let sib = next(&mut at)?;
        if md == 0 && sib & 7 == 5 {
            disp = 4;
        }
    } else if md == 0 && rm == 5 {
        disp = 4; // disp32 (RIP-relative in 64-bit mode)
    }
    for _ in 0..disp {
        next(&mut at)?;
    }
    let reg = |byte: bool| {
        let index = reg_field | if rex & 4 != 0 { 8 } else { 0 };
        // Without REX, byte registers 4-7 are AH, CH, DH, BH.
        let high8 = byte && rex == 0 && (4..8).contains(&index);
        Reg {
            index: if high8 { index - 4 } else { index },
            high8,
        }
    };
    let op = match kind {
        Kind::Store => Op::StoreReg {
            reg: reg(size == 1),
        },
        Kind::Load => Op::Load {
            reg: reg(size == 1),
            dest: size,
            sign: false,
        },
        Kind::Extend(sign) => Op::Load {
            reg: reg(false),
            dest: if wide == 8 { 8 } else { wide },
            sign,
        },
        Kind::Imm => {
            if reg_field != 0 {
                return Err(DecodeError::Extension(reg_field));
            }
            let n = size.min(4);
            let mut v = 0u64;
            for i in 0..n {
                v |= u64::from(next(&mut at)?) << (8 * i);
            }
            // Sign-extended from the immediate's width.
            let shift = 64 - 8 * u32::from(n);
            Op::StoreImm {
                value: (((v << shift) as i64) >> shift) as u64,
            }
        }
    };
    Ok(Insn {
        op,
        size,
        len: at as u8,
    })
}

#[derive(Clone, Copy)]
enum Kind {
    Store,
    Load,
    /// MOVZX (false) or MOVSX (true).
    Extend(bool),
    Imm,
}

/// The low `size` bytes of `v`.
pub fn truncate(v: u64, size: u8) -> u64 {
    match size {
        1 => v & 0xff,
        2 => v & 0xffff,
        4 => v & 0xffff_ffff,
        _ => v,
    }
}

/// Where register `index` (x86's number) is in `ipc_schema::syscall::regs`
/// order (RAX, RBX, RCX, RDX, RSI, RDI, RBP, RSP, R8...).
pub fn slot(index: u8) -> usize {
    const SLOTS: [usize; 8] = [0, 2, 3, 1, 7, 6, 4, 5];
    SLOTS
        .get(usize::from(index))
        .copied()
        .unwrap_or(usize::from(index & 15))
}

/// The value a register read as the instruction names it, cut to `size`
/// (`regs` in `ipc_schema::syscall::regs` order).
pub fn read_reg(regs: &[u64], reg: Reg, size: u8) -> u64 {
    let v = regs.get(slot(reg.index)).copied().unwrap_or(0);
    truncate(if reg.high8 { v >> 8 } else { v }, size)
}

/// Register `old` after a load of `value` (`size` bytes read) into it as
/// `op` does: 32-bit destinations zero the upper half, 8- and 16-bit ones
/// keep the rest, AH-BH write bits 8-15.
pub fn load_into(old: u64, value: u64, size: u8, reg: Reg, dest: u8, sign: bool) -> u64 {
    let v = truncate(value, size);
    let v = if sign && size < 8 {
        let shift = 64 - 8 * u32::from(size);
        (((v << shift) as i64) >> shift) as u64
    } else {
        v
    };
    if reg.high8 {
        return (old & !0xff00) | ((v & 0xff) << 8);
    }
    match dest {
        1 => (old & !0xff) | (v & 0xff),
        2 => (old & !0xffff) | (v & 0xffff),
        4 => v & 0xffff_ffff,
        _ => v,
    }
}
