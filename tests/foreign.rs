//! Foreign mappings (issue 13, points 2 and 6; FM-1..FM-3,
//! docs/introspection.md, Foreign mappings): a service reaches guest
//! memory through mappings counted per domain; a protected domain stays
//! paused while one exists and unpauses once it goes, except for pages the
//! guest itself grants, mapped while it runs and kept while it unpauses;
//! a service that dies holding mappings leaves none behind; bad input
//! refused by name.

use image_builder::emulator::Machine;
use ipc_schema::halt::HaltStatus;
use ipc_schema::syscall::DomainOp;
use parallax_tests::{boot_live, system};

/// The probe task (bad input, then the protected `vault`), the `mapper`
/// (the probe's crate with a `hold-open` handle: holds mappings of `open`,
/// then faults) and two ticker guests, the first protected.
const MANIFEST: &str = r#"
name = "foreign"
standard_services = true

[[service]]
name = "probe"
task = true
handles = [
    { name = "altp2m", endpoint = "altp2m", rights = ["call"] },
    { name = "exits", endpoint = "exits", rights = ["call"] },
    { name = "domains-ro", domains = true, rights = ["read"] },
    { name = "open", domain = "open", rights = ["read"] },
    { name = "vault", domain = "vault", rights = ["read"] },
]

[[service]]
name = "mapper"
crate = "probe"
on_fault = "hold"
handles = [
    { name = "hold-open", domain = "open", rights = ["read"] },
]

[[domain]]
name = "vault"
guest = "ticker"
memory_mib = 16
cmdline = "ticks=0 calls=20 grant=0xe00"
protected = true

[[domain]]
name = "open"
guest = "ticker"
memory_mib = 16
cmdline = "ticks=0 calls=20"
"#;

use parallax_tests::ctl::{ok, refused};

/// The row of `cargo hv ctl domains` for `name`, split in columns.
fn row(table: &str, name: &str) -> Vec<String> {
    table
        .lines()
        .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .find(|c| c.get(1).is_some_and(|n| n == name))
        .unwrap_or_else(|| panic!("no row for {name} in\n{table}"))
}

/// The host's marker (the probe's `MARKER`), in hex for `ctl mem write`.
fn marker() -> String {
    b"unmap-me-please!"
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The foreign-mapped pages `DomainInfo` reports for domain `id`.
fn foreign_pages(live: &parallax_tests::Live, id: u16) -> (u32, bool) {
    let d = live.control().domains().expect("domains listed");
    let d = d.iter().find(|d| d.id == id).expect("the domain is listed");
    (d.foreign_pages, d.protected)
}

#[test]
fn a_protected_domain_stays_paused_while_mapped_and_a_dead_mapper_leaves_no_mapping() {
    let run = boot_live(
        &system("foreign", MANIFEST),
        Machine::Bochs,
        |c| c.timeout = std::time::Duration::from_secs(900),
        |live| {
            let s = live.socket().to_owned();
            // FM-2: the probe holds 2 pages of the paused, protected vault,
            // and the page it grants (mapped while it ran).
            live.wait_for("probe", "waiting for the vault to be paused", 600);
            ok(&s, &["pause", "1"]);
            live.wait_for("probe", "holding 2 pages of the vault", 120);
            let e = refused(&s, &["unpause", "1"]);
            assert!(
                e.contains("ForeignMapped") && e.contains("protected"),
                "{e}"
            );
            let table = ok(&s, &["domains"]);
            assert!(
                table.contains("PROTECTED") && table.contains("FOREIGN PAGES"),
                "{table}"
            );
            let vault = row(&table, "vault");
            assert_eq!(vault[2], "paused", "{table}");
            assert_eq!(&vault[vault.len() - 2..], ["yes", "3"], "{table}");
            assert_eq!(row(&table, "open").last().unwrap(), "0", "{table}");
            // The host writes through the introspect service, which maps
            // the page for the write only: the probe sees it and unmaps.
            ok(&s, &["mem", "write", "1", "0xf00010", &marker()]);
            live.wait_for("probe", "the vault's mapping is gone", 120);
            // FM-2's exception: the granted page, still mapped, does not
            // keep it paused.
            assert_eq!(foreign_pages(live, 1), (1, true));
            ok(&s, &["unpause", "1"]);
            live.ticks_on("dom1", 2, 120);
            // Running, a protected domain's memory is not mapped, so not read.
            let e = refused(&s, &["mem", "read", "1", "0xf00010", "16"]);
            assert!(e.contains("protected"), "{e}");
            live.wait_for("probe", "probe: all checks passed", 600);

            // FM-3: the mapper holds 6 pages of `open`, then faults.
            ok(&s, &["pause", "2"]);
            live.wait_for("mapper", "mapper holds 6 pages of domain 2", 120);
            assert_eq!(foreign_pages(live, 2), (6, false));
            // Not protected: it unpauses with the mappings there.
            ok(&s, &["unpause", "2"]);
            ok(&s, &["mem", "write", "2", "0xf00010", &marker()]);
            live.wait_for("init", "service mapper faulted; holding it", 120);
            assert_eq!(foreign_pages(live, 2), (0, false));
            let open = row(&ok(&s, &["domains"]), "open");
            assert_eq!(open.last().unwrap(), "0");
            live.ticks_on("dom2", 2, 120);
            let mut c = live.control();
            c.domain_control(1, DomainOp::Destroy).unwrap();
            c.domain_control(2, DomainOp::Destroy).unwrap();
        },
    );
    for check in [
        "a foreign mapping shows the guest's memory: ok",
        "a foreign mapping is counted in its domain: ok",
        "a foreign mapping over a mapped va: ok (refused with BadArgument)",
        "FRAMES_UNMAP over a foreign mapping: ok (refused with BadArgument)",
        "FOREIGN_UNMAP of part of a mapping: ok (refused with BadArgument)",
        "FOREIGN_UNMAP where nothing is mapped: ok (refused with BadArgument)",
        "unmapped, the count is back: ok",
        "foreign map of 0 pages: ok (refused with BadArgument)",
        "foreign map of 513 pages: ok (refused with BadArgument)",
        "foreign map of u64::MAX pages: ok (refused with BadArgument)",
        "foreign map past RAM: ok (refused with BadAddress)",
        "foreign map running past RAM: ok (refused with BadAddress)",
        "foreign map at gfn u64::MAX: ok (refused with BadAddress)",
        "foreign map below the window: ok (refused with BadArgument)",
        "foreign map across the window's end: ok (refused with BadArgument)",
        "foreign map at an unaligned va: ok (refused with BadArgument)",
        "foreign map wrapping the address space: ok (refused with BadArgument)",
        "foreign map writable without write: ok (refused with MissingRight)",
        "foreign map writable through domains-ro: ok (refused with MissingRight)",
        "foreign map of another domain: ok (refused with OutOfScope)",
        "foreign map of no domain: ok (refused with BadArgument)",
        "a 17th foreign mapping: ok (refused with NoResources)",
        "16 foreign mappings a process, then refused: ok",
        "the page a running protected domain grants is mapped: ok",
        "the guest's writes to its granted page are seen while it runs: ok",
        "a running protected domain's ungranted page is not mapped: ok (refused with Busy)",
        "a range reaching past the granted page is not mapped: ok (refused with Busy)",
        "a paused protected domain is mapped: ok",
        "the host's write is seen through the mapping: ok",
        "the vault's pages unmapped: ok",
        "unpaused with its granted page mapped, the guest ticks on: ok",
        "the granted page unmapped: ok",
        "probe: all checks passed",
    ] {
        run.expect_from("probe", check);
    }
    run.expect("domain 1 (vault) created by init, protected")
        .expect("domain 1 (vault) is protected and services hold 2 pages of it foreign-mapped: not unpaused")
        .expect("service probe: FOREIGN_MAP refused: the domain is protected and running, and the guest does not grant these pages (pause it first)")
        .expect_from("dom1", "ticker: granting pages outside RAM refused: BadGfn")
        .expect_from("dom1", "ticker: granting no page refused: BadRange")
        .expect_from("dom1", "ticker: taking back pages not granted refused: NotGranted")
        .expect_from("dom1", "ticker: grants gfn 0xe00")
        .expect("service mapper: its 3 foreign mappings torn down")
        .expect_from("init", "task probe ended (code 0)")
        .expect_no("crashed")
        .expect_status(HaltStatus::Success);
}
