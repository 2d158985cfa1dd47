//! The introspect logic against a model guest: memory, page tables built
//! here, registers, a paused flag.

use super::*;
use ipc_schema::introspect::{Address, CHUNK, IntroError, IntroReply, IntroRequest, MAX_SET};

const RAM: usize = 4 << 20;
const D: u16 = 1;

struct Model {
    ram: Vec<u8>,
    regs: [u64; regs::COUNT],
    paused: bool,
}

impl Guest for Model {
    fn read(&mut self, domain: u16, gpa: u64, out: &mut [u8]) -> Result<(), SysError> {
        if domain != D {
            return Err(SysError::BadArgument);
        }
        let s = usize::try_from(gpa).map_err(|_| SysError::BadAddress)?;
        let src = self
            .ram
            .get(s..s.checked_add(out.len()).ok_or(SysError::BadAddress)?)
            .ok_or(SysError::BadAddress)?;
        out.copy_from_slice(src);
        Ok(())
    }
    fn write(&mut self, domain: u16, gpa: u64, bytes: &[u8]) -> Result<(), SysError> {
        if domain != D {
            return Err(SysError::BadArgument);
        }
        let s = usize::try_from(gpa).map_err(|_| SysError::BadAddress)?;
        let e = s.checked_add(bytes.len()).ok_or(SysError::BadAddress)?;
        self.ram
            .get_mut(s..e)
            .ok_or(SysError::BadAddress)?
            .copy_from_slice(bytes);
        Ok(())
    }
    fn regs(&mut self, domain: u16, _: u16) -> Result<[u64; regs::COUNT], SysError> {
        if domain != D {
            return Err(SysError::BadArgument);
        }
        Ok(self.regs)
    }
    fn set_regs(
        &mut self,
        _: u16,
        _: u16,
        values: &[u64; regs::COUNT],
        mask: u64,
    ) -> Result<(), SetError> {
        if !self.paused {
            return Err(SetError::Sys(SysError::Busy));
        }
        // The kernel's check, reduced to one rule: RIP below 4 GiB.
        if mask & 1 << regs::RIP != 0 && values[regs::RIP] >> 32 != 0 {
            return Err(SetError::Refused(regs::RIP));
        }
        for (i, (r, v)) in self.regs.iter_mut().zip(values).enumerate() {
            if mask & 1 << i != 0 {
                *r = *v;
            }
        }
        Ok(())
    }
}

const P: u64 = 1;
const RW: u64 = 2;
const PS: u64 = 1 << 7;

/// A guest in 4-level paging: PML4 at 0x1000, PDPT 0x2000, PD 0x3000, PT
/// 0x4000. gva 0x40_0000 (2 MiB page) -> gpa 0x20_0000; gva 0x1000 ->
/// gpa 0x9000 and gva 0x2000 -> gpa 0x7000 (4 KiB pages, out of order);
/// gva 0x3000 not present.
fn guest() -> Model {
    let mut m = Model {
        ram: vec![0; RAM],
        regs: [0; regs::COUNT],
        paused: false,
    };
    let mut put = |gpa: u64, v: u64| m.write(D, gpa, &v.to_le_bytes()).unwrap();
    put(0x1000, 0x2000 | P | RW);
    put(0x2000, 0x3000 | P | RW);
    put(0x3000, 0x4000 | P | RW); // PD[0] -> PT
    put(0x3000 + 2 * 8, 0x20_0000 | P | RW | PS); // PD[2]: 2 MiB at 4 MiB
    put(0x4000 + 8, 0x9000 | P | RW);
    put(0x4000 + 2 * 8, 0x7000 | P);
    m.regs[regs::CR0] = 0x8001_0033;
    m.regs[regs::CR4] = 0x20;
    m.regs[regs::EFER] = 0x500;
    m.regs[regs::CR3] = 0x1000;
    m
}

/// Every caller may do everything (the checks are tested apart).
fn answer(m: &mut Model, r: &IntroRequest) -> IntroReply {
    super::answer(m, r, |_, _| Ok(()))
}

fn read(m: &mut Model, at: Address, len: u16) -> IntroReply {
    answer(m, &IntroRequest::Read { domain: D, at, len })
}

fn virt(gva: u64) -> Address {
    Address::Virtual {
        vcpu: 0,
        cr3: None,
        gva,
    }
}

#[test]
fn physical_memory_is_read_and_written_and_bad_spans_are_named() {
    let mut m = guest();
    let bytes = BoundedVec(heapless::Vec::from_slice(b"parallax").unwrap());
    let w = IntroRequest::Write {
        domain: D,
        at: Address::Physical(0x8000),
        bytes,
    };
    assert_eq!(answer(&mut m, &w), IntroReply::Done);
    let IntroReply::Bytes(b) = read(&mut m, Address::Physical(0x8000), 8) else {
        panic!()
    };
    assert_eq!(&b.0[..], b"parallax");
    // A read across the end of RAM names the end, where RAM stops (not
    // where the read began); one wholly outside names its start.
    let across = RAM as u64 - 4;
    assert_eq!(
        read(&mut m, Address::Physical(across), 8),
        IntroReply::Refused(IntroError::OutsideRam { gpa: RAM as u64 })
    );
    assert_eq!(
        read(&mut m, Address::Physical(RAM as u64 + 0x10), 8),
        IntroReply::Refused(IntroError::OutsideRam {
            gpa: RAM as u64 + 0x10
        })
    );
    let w = IntroRequest::Write {
        domain: D,
        at: Address::Physical(across),
        bytes: BoundedVec(heapless::Vec::from_slice(&[1; 8]).unwrap()),
    };
    assert_eq!(
        answer(&mut m, &w),
        IntroReply::Refused(IntroError::OutsideRam { gpa: RAM as u64 })
    );
    assert_eq!(
        read(&mut m, Address::Physical(0), CHUNK as u16 + 1),
        IntroReply::Refused(IntroError::BadLength)
    );
    assert_eq!(
        read(&mut m, Address::Physical(u64::MAX - 2), 8),
        IntroReply::Refused(IntroError::BadLength),
        "a span that wraps"
    );
    let other = IntroRequest::Read {
        domain: 9,
        at: Address::Physical(0),
        len: 1,
    };
    assert_eq!(
        answer(&mut m, &other),
        IntroReply::Refused(IntroError::NoSuchDomain)
    );
}

#[test]
fn virtual_memory_goes_through_the_guests_tables_page_by_page() {
    let mut m = guest();
    m.write(D, 0x9ffc, b"abcd").unwrap();
    m.write(D, 0x7000, b"efgh").unwrap();
    // gva 0x1ffc..0x2004 spans two pages that are apart in guest RAM.
    let IntroReply::Bytes(b) = read(&mut m, virt(0x1ffc), 8) else {
        panic!()
    };
    assert_eq!(&b.0[..], b"abcdefgh");
    let t = answer(
        &mut m,
        &IntroRequest::Translate {
            domain: D,
            vcpu: 0,
            cr3: None,
            gva: 0x40_0123,
        },
    );
    let IntroReply::Translated(t) = t else {
        panic!("{t:?}")
    };
    assert_eq!((t.gpa, t.page_size, t.cr3), (0x20_0123, 2 << 20, 0x1000));
    assert!(t.writable && !t.user && t.executable);
    // gva 0x2000 is read-only: a write through it still goes (the host is
    // not the guest), and the translation says so.
    let IntroReply::Translated(t) = answer(
        &mut m,
        &IntroRequest::Translate {
            domain: D,
            vcpu: 0,
            cr3: None,
            gva: 0x2000,
        },
    ) else {
        panic!()
    };
    assert!(!t.writable);
    assert_eq!(
        read(&mut m, virt(0x3000), 1),
        IntroReply::Refused(IntroError::NotPresent {
            level: 1,
            entry_gpa: 0x4000 + 3 * 8,
            entry: 0
        })
    );
    assert_eq!(
        read(&mut m, virt(0x0000_8000_0000_0000), 1),
        IntroReply::Refused(IntroError::BadAddress {
            gva: 0x0000_8000_0000_0000
        })
    );
    let garbage = Address::Virtual {
        vcpu: 0,
        cr3: Some(0x7fff_f000),
        gva: 0x1000,
    };
    assert!(matches!(
        read(&mut m, garbage, 1),
        IntroReply::Refused(IntroError::TableOutsideRam { .. })
    ));
    assert_eq!(
        read(
            &mut m,
            Address::Virtual {
                vcpu: 3,
                cr3: None,
                gva: 0
            },
            1
        ),
        IntroReply::Refused(IntroError::NoSuchVcpu)
    );
}

#[test]
fn registers_are_read_in_halves_and_set_only_when_paused_and_valid() {
    let mut m = guest();
    m.regs[regs::RIP] = 0x10_0000;
    let half = |m: &mut Model, half| {
        answer(
            m,
            &IntroRequest::Regs {
                domain: D,
                vcpu: 0,
                half,
            },
        )
    };
    let IntroReply::Regs { first, values } = half(&mut m, 1) else {
        panic!()
    };
    assert_eq!((first, values[regs::RIP - 16]), (16, 0x10_0000));
    assert!(matches!(
        half(&mut m, 2),
        IntroReply::Refused(IntroError::NoSuchRegister { .. })
    ));
    let set = |values: &[(u8, u64)]| IntroRequest::SetRegs {
        domain: D,
        vcpu: 0,
        values: BoundedVec(heapless::Vec::from_slice(values).unwrap()),
    };
    let rax = set(&[(regs::RAX as u8, 7)]);
    assert_eq!(
        answer(&mut m, &rax),
        IntroReply::Refused(IntroError::NotPaused)
    );
    m.paused = true;
    assert_eq!(answer(&mut m, &rax), IntroReply::Done);
    assert_eq!(m.regs[regs::RAX], 7);
    assert_eq!(
        answer(&mut m, &set(&[(regs::CS as u8, 0)])),
        IntroReply::Refused(IntroError::NoSuchRegister {
            index: regs::CS as u8
        })
    );
    assert_eq!(
        answer(&mut m, &set(&[(200, 0)])),
        IntroReply::Refused(IntroError::NoSuchRegister { index: 200 })
    );
    // Refused whole: RAX is not set with the bad RIP.
    let both = set(&[(regs::RAX as u8, 9), (regs::RIP as u8, 1 << 40)]);
    assert_eq!(
        answer(&mut m, &both),
        IntroReply::Refused(IntroError::BadRegister {
            index: regs::RIP as u8
        })
    );
    assert_eq!(m.regs[regs::RAX], 7);
    const { assert!(MAX_SET >= 8) };
}

#[test]
fn each_request_needs_its_right_over_its_domain() {
    use ipc_schema::manifest::introspection::{READ, WRITE};
    let mut m = guest();
    let r = IntroRequest::Read {
        domain: D,
        at: Address::Physical(0),
        len: 1,
    };
    let w = IntroRequest::SetRegs {
        domain: D,
        vcpu: 0,
        values: BoundedVec(heapless::Vec::new()),
    };
    assert_eq!(needs(&r), (D, READ));
    assert_eq!(needs(&w), (D, WRITE));
    let only_read = |d: u16, right: u8| {
        if d == D && right == READ {
            Ok(())
        } else {
            Err(IntroError::NotAllowed)
        }
    };
    assert!(matches!(
        super::answer(&mut m, &r, only_read),
        IntroReply::Bytes(_)
    ));
    assert_eq!(
        super::answer(&mut m, &w, only_read),
        IntroReply::Refused(IntroError::NotAllowed)
    );
    // The check's refusal is the answer, nothing read: a domain that is not
    // there is named as such whatever the rights.
    for refusal in [IntroError::NotAllowed, IntroError::NoSuchDomain] {
        assert_eq!(
            super::answer(&mut m, &r, |_, _| Err(refusal)),
            IntroReply::Refused(refusal)
        );
    }
}
