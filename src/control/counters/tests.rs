use std::collections::HashSet;

use super::*;

pub fn snapshot_with<R>(f: impl FnOnce(&Snapshot) -> R) -> R {
    let mut stats = Stats {
        bytes_up: 1000,
        bytes_down: 2000,
        flows_opened: 3,
        malformed: 4,
        ..Stats::default()
    };
    stats.udp.bytes_up = 500;
    stats.udp.echo_bytes_up = 64;
    stats.udp.flows_opened = 5;
    stats.udp.echo_flows_opened = 2;
    let gauges = Gauges {
        tcp_open: 2,
        resident: Some(4096),
        ..Gauges::default()
    };
    let clients = Clients {
        accepted: 7,
        ..Clients::default()
    };
    f(&Snapshot {
        stats: &stats,
        gauges: &gauges,
        control: &clients,
        metrics: &Clients::default(),
    })
}

#[test]
fn keys_are_unique_and_families_come_in_one_run() {
    let keys: HashSet<&str> = TABLE.iter().map(|entry| entry.key).collect();
    assert_eq!(keys.len(), TABLE.len(), "a key used twice");
    let mut seen = HashSet::new();
    let mut last = "";
    for entry in TABLE {
        if entry.family.name != last {
            assert!(
                seen.insert(entry.family.name),
                "{} split",
                entry.family.name
            );
            last = entry.family.name;
        }
    }
    let label_sets: HashSet<(&str, Vec<(&str, &str)>)> = TABLE
        .iter()
        .map(|entry| (entry.family.name, entry.labels.to_vec()))
        .collect();
    assert_eq!(
        label_sets.len(),
        TABLE.len(),
        "two entries with the same labels"
    );
}

#[test]
fn ping_is_told_apart_from_udp() {
    let all: Vec<(&Entry, u64)> = snapshot_with(|snapshot| samples(snapshot).collect());
    let value = |key: &str| all.iter().find(|(entry, _)| entry.key == key).unwrap().1;
    assert_eq!(value("udp_bytes_up"), 436);
    assert_eq!(value("icmp_bytes_up"), 64);
    assert_eq!(value("udp_flows_opened"), 3);
    assert_eq!(value("icmp_flows_opened"), 2);
    assert_eq!(value("control_accepted"), 7);
    assert_eq!(value("memory_resident_bytes"), 4096);
}

#[test]
fn a_number_that_could_not_be_had_is_left_out() {
    let stats = Stats::default();
    let (gauges, clients) = (Gauges::default(), Clients::default());
    let snapshot = Snapshot {
        stats: &stats,
        gauges: &gauges,
        control: &clients,
        metrics: &clients,
    };
    assert_eq!(samples(&snapshot).count(), TABLE.len() - 1);
    assert!(samples(&snapshot).all(|(entry, _)| entry.key != "memory_resident_bytes"));
}
