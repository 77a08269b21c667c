use super::*;

fn table(v4: &str, exclude: &[&str], capacity: usize) -> FakeTable {
    let (addr, prefix) = v4.split_once('/').unwrap();
    let v4 = Ipv4Cidr::new(addr.parse().unwrap(), prefix.parse().unwrap());
    let v6 = Ipv6Cidr::new("fd7a:7072:7879:f4::".parse().unwrap(), 64);
    let exclude: Vec<IpAddr> = exclude.iter().map(|a| a.parse().unwrap()).collect();
    FakeTable::new(v4, v6, &exclude, capacity).unwrap()
}

fn at(secs: i64) -> Instant {
    Instant::from_secs(secs)
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

#[test]
fn a_name_gets_one_address_of_each_family_and_keeps_them() {
    let mut fake = table("198.18.0.0/16", &[], 100);
    let slot = fake.lookup("www.example.com", at(0)).unwrap();
    assert_eq!(fake.v4(slot), Ipv4Addr::new(198, 18, 0, 1));
    assert_eq!(fake.v6(slot), ip("fd7a:7072:7879:f4::1"));
    let other = fake.lookup("example.org", at(0)).unwrap();
    assert_eq!(fake.v4(other), Ipv4Addr::new(198, 18, 0, 2));
    assert_eq!(fake.lookup("www.example.com", at(1)), Some(slot));
    for addr in ["198.18.0.1", "fd7a:7072:7879:f4::1"] {
        assert_eq!(fake.name_of(ip(addr)), Some("www.example.com"));
    }
    assert_eq!(fake.name_of(ip("198.18.0.3")), None, "not handed out yet");
    assert_eq!(fake.name_of(ip("198.19.0.1")), None);
    assert!(fake.contains(ip("198.18.255.255")) && fake.contains(ip("fd7a:7072:7879:f4::ffff")));
    assert!(!fake.contains(ip("198.19.0.1")) && !fake.contains(ip("fd7a:7072:7879:f5::1")));
    assert_eq!(fake.counters().size, 2);
}

#[test]
fn network_broadcast_and_excluded_addresses_are_never_handed_out() {
    // A /29 has 6 host addresses; the TUN's two are excluded, as is one IPv6 address at
    // an offset inside the range.
    let mut fake = table(
        "198.18.0.0/29",
        &[
            "198.18.0.1",
            "198.18.0.2",
            "fd7a:7072:7879:f4::5",
            "10.0.0.1",
        ],
        100,
    );
    assert_eq!(fake.capacity(), 3);
    let addrs: Vec<Ipv4Addr> = ["a", "b", "c"]
        .iter()
        .map(|name| {
            let slot = fake.lookup(name, at(0)).unwrap();
            fake.v4(slot)
        })
        .collect();
    assert_eq!(
        addrs,
        [[198, 18, 0, 3], [198, 18, 0, 4], [198, 18, 0, 6]].map(Ipv4Addr::from)
    );
    assert_eq!(fake.lookup("d", at(1)), None, "all used within MIN_IDLE");
    for (addr, name) in [
        ("198.18.0.3", "a"),
        ("fd7a:7072:7879:f4::4", "b"),
        ("198.18.0.6", "c"),
    ] {
        assert_eq!(fake.name_of(ip(addr)), Some(name));
    }
    for unmapped in [
        "198.18.0.0",
        "198.18.0.1",
        "198.18.0.5",
        "198.18.0.7",
        "fd7a:7072:7879:f4::5",
    ] {
        assert_eq!(fake.name_of(ip(unmapped)), None, "{unmapped}");
        assert!(!fake.hold(ip(unmapped)));
    }
    assert!(
        FakeTable::new(
            Ipv4Cidr::new(Ipv4Addr::new(198, 18, 0, 0), 31),
            Ipv6Cidr::new(ip6("fd00::"), 64),
            &[],
            10
        )
        .is_err()
    );
    assert!(
        FakeTable::new(
            Ipv4Cidr::new(Ipv4Addr::new(198, 18, 0, 0), 16),
            Ipv6Cidr::new(ip6("fd00::"), 120),
            &[],
            10
        )
        .is_err(),
        "an IPv6 range smaller than the IPv4 one"
    );
}

fn ip6(text: &str) -> Ipv6Addr {
    text.parse().unwrap()
}

#[test]
fn the_least_recently_used_entry_is_reused_after_min_idle() {
    let mut fake = table("198.18.0.0/16", &[], 3);
    for name in ["a", "b", "c"] {
        fake.lookup(name, at(0)).unwrap();
    }
    fake.lookup("a", at(1)).unwrap();
    assert_eq!(fake.lookup("d", at(1)), None, "b and c were used 1 s ago");
    let d = fake.lookup("d", at(2)).unwrap();
    assert_eq!(fake.v4(d), Ipv4Addr::new(198, 18, 0, 2), "b's address");
    assert_eq!(fake.name_of(ip("198.18.0.2")), Some("d"));
    assert_eq!(
        fake.name_of(ip("fd7a:7072:7879:f4::2")),
        Some("d"),
        "both families move"
    );
    let e = fake.lookup("e", at(2)).unwrap();
    assert_eq!(fake.v4(e), Ipv4Addr::new(198, 18, 0, 3), "then c's");
    assert_eq!(fake.lookup("f", at(2)), None, "a was used 1 s ago");
    let f = fake.lookup("f", at(3)).unwrap();
    assert_eq!(fake.v4(f), Ipv4Addr::new(198, 18, 0, 1), "then a's");
    // b comes back with another address.
    let b = fake.lookup("b", at(4)).unwrap();
    assert_eq!(fake.v4(b), Ipv4Addr::new(198, 18, 0, 2));
    assert_eq!(fake.name_of(ip("198.18.0.2")), Some("b"));
    let counters = fake.counters();
    assert_eq!(
        (counters.size, counters.evictions, counters.full),
        (3, 4, 2)
    );
}

#[test]
fn held_entries_are_never_reused() {
    let mut fake = table("198.18.0.0/16", &[], 2);
    fake.lookup("a", at(0)).unwrap();
    fake.lookup("b", at(0)).unwrap();
    assert!(fake.hold(ip("198.18.0.1")));
    assert!(
        fake.hold(ip("fd7a:7072:7879:f4::1")),
        "a second flow, over IPv6"
    );
    assert!(fake.hold(ip("198.18.0.2")));
    assert_eq!(fake.lookup("c", at(100)), None, "both held");
    fake.release(ip("198.18.0.1"));
    assert_eq!(fake.lookup("c", at(100)), None, "a still held once");
    fake.release(ip("198.18.0.2"));
    let c = fake.lookup("c", at(100)).unwrap();
    assert_eq!(fake.v4(c), Ipv4Addr::new(198, 18, 0, 2));
    assert!(fake.hold(ip("198.18.0.2")));
    // Releasing more often than held, or an address with no name, changes nothing.
    fake.release(ip("198.18.0.1"));
    fake.release(ip("198.18.0.1"));
    fake.release(ip("198.18.0.9"));
    assert!(fake.hold(ip("198.18.0.1")));
    assert_eq!(fake.lookup("d", at(200)), None, "a and c are held");
    fake.release(ip("198.18.0.1"));
    let d = fake.lookup("d", at(200)).unwrap();
    assert_eq!(fake.v4(d), Ipv4Addr::new(198, 18, 0, 1));
    // A name looked up while held stays held.
    fake.lookup("c", at(300)).unwrap();
    assert_eq!(
        fake.lookup("e", at(300)).map(|s| fake.v4(s)),
        Some(Ipv4Addr::new(198, 18, 0, 1))
    );
    assert_eq!(
        fake.lookup("f", at(300)),
        None,
        "e was just used, c is held"
    );
    assert_eq!(fake.name_of(ip("198.18.0.2")), Some("c"));
    assert_eq!(fake.counters().full, 4);
}

#[test]
fn names_churn_through_a_full_table_without_growing_it() {
    let mut fake = table("198.18.0.0/16", &[], 65_536);
    assert_eq!(fake.capacity(), 65_534, "a /16 has 65,534 host addresses");
    let memory = |fake: &FakeTable| {
        (
            fake.entries.capacity(),
            fake.names.capacity(),
            fake.index.capacity(),
            (fake.long_names.capacity(), fake.long_free.capacity()),
        )
    };
    let before = memory(&fake);
    let mut name = String::new();
    for i in 0..70_000u32 {
        name.clear();
        name.push_str(&format!("host-{i}.example.com"));
        // Some long names, which go to the pool.
        if i % 100 == 0 {
            name.push_str(&".long".repeat(20));
        }
        let slot = fake.lookup(&name, at(i64::from(i / 1000) * 10)).unwrap();
        let addr = IpAddr::V4(fake.v4(slot));
        assert_eq!(fake.name_of(addr), Some(name.as_str()));
        assert_eq!(fake.name_of(IpAddr::V6(fake.v6(slot))), Some(name.as_str()));
    }
    assert_eq!(memory(&fake), before);
    let counters = fake.counters();
    assert_eq!(
        (counters.size, counters.evictions),
        (65_534, 70_000 - 65_534)
    );
    // The first names went first; the last are all found.
    // Name 69,999 took the slot of name 69,999 - 65,534.
    let last = fake.lookup("host-69999.example.com", at(1000)).unwrap();
    let first = u32::from(Ipv4Addr::new(198, 18, 0, 1));
    assert_eq!(fake.v4(last), Ipv4Addr::from(first + (69_999 - 65_534)));
    for i in (70_000 - 65_534)..70_000u32 {
        let name = format!("host-{i}.example.com");
        if i % 100 == 0 {
            continue;
        }
        assert!(fake.find(&name, fake.hash(&name)).is_some(), "{name}");
    }
    for i in 0..(70_000 - 65_534u32) {
        let name = format!("host-{i}.example.com");
        assert!(fake.find(&name, fake.hash(&name)).is_none(), "{name}");
    }
}

#[test]
fn the_index_matches_a_model_under_random_churn() {
    // A small table in a busy index: deletions shift entries back across the wrap.
    // 40 entries: a pool of 2 long names.
    let mut fake = table("198.18.0.0/24", &[], 40);
    let mut model: std::collections::HashMap<String, Ipv4Addr> = Default::default();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for step in 0..50_000i64 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        // One name in ten is long: 10 long names share a pool of 2.
        let n = state % 97;
        let name = if n < 10 {
            format!("n{n}.{}", "long".repeat(20))
        } else {
            format!("n{n}")
        };
        let now = at(step * 3);
        let slot = fake.lookup(&name, now).unwrap();
        let addr = fake.v4(slot);
        if let Some(&known) = model.get(&name) {
            assert_eq!(addr, known, "a name in the table keeps its address");
        }
        model.retain(|_, a| *a != addr);
        model.insert(name.clone(), addr);
        for (name, &addr) in &model {
            assert_eq!(fake.name_of(IpAddr::V4(addr)), Some(name.as_str()));
        }
        assert_eq!(model.len(), fake.counters().size as usize);
    }
}

#[test]
fn long_names_take_each_others_places_when_their_pool_is_full() {
    // 32 entries: a pool of 2 long names.
    let mut fake = table("198.18.0.0/24", &[], 32);
    let long = |i: usize| format!("{}.n{i}.example", "x".repeat(60));
    for i in 0..2 {
        fake.lookup(&long(i), at(0)).unwrap();
    }
    fake.lookup("short.example", at(0)).unwrap();
    assert_eq!(fake.lookup(&long(2), at(1)), None, "both long names in use");
    fake.lookup(&long(0), at(2)).unwrap();
    // The third long name takes the place of the oldest long one, though the table has
    // room.
    let third = fake.lookup(&long(2), at(3)).unwrap();
    assert_eq!(fake.v4(third), Ipv4Addr::new(198, 18, 0, 2));
    assert_eq!(fake.name_of(ip("198.18.0.2")), Some(long(2).as_str()));
    assert_eq!(fake.name_of(ip("198.18.0.1")), Some(long(0).as_str()));
    assert_eq!(fake.name_of(ip("198.18.0.3")), Some("short.example"));
    let counters = fake.counters();
    assert_eq!(
        (counters.size, counters.evictions, counters.full),
        (3, 1, 1)
    );
    // Held long names stay.
    assert!(fake.hold(ip("198.18.0.1")) && fake.hold(ip("198.18.0.2")));
    assert_eq!(fake.lookup(&long(3), at(100)), None);
    fake.release(ip("198.18.0.1"));
    let fourth = fake.lookup(&long(3), at(100)).unwrap();
    assert_eq!(fake.v4(fourth), Ipv4Addr::new(198, 18, 0, 1));
    // A short name evicting a long one gives its pool slot back.
    let mut small = table("198.18.0.0/29", &[], 2);
    small.lookup(&long(0), at(0)).unwrap();
    small.lookup("a", at(0)).unwrap();
    small.lookup("b", at(10)).unwrap();
    assert_eq!(small.long_free.len(), 1);
    let again = small.lookup(&long(1), at(20)).unwrap();
    assert_eq!(
        small.name_of(IpAddr::V4(small.v4(again))),
        Some(long(1).as_str())
    );
}
