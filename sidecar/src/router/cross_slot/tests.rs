//! Planning a transaction across slots, and merging its replies.

use super::*;

fn cmd(args: &[&str]) -> Vec<Bytes> {
    args.iter()
        .map(|a| Bytes::copy_from_slice(a.as_bytes()))
        .collect()
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

#[test]
fn one_slot_is_the_usual_transaction_and_an_unsplittable_command_is_refused() {
    let same = [cmd(&["SET", "{t}a", "1"]), cmd(&["PING"]), cmd(&["GET", "{t}b"])];
    assert_eq!(plan(&same), Ok(None));
    assert_eq!(plan(&[cmd(&["PING"])]), Ok(None));
    let rename = [cmd(&["RENAME", "a", "b"])];
    assert!(plan(&rename).unwrap_err().starts_with(b"-CROSSSLOT"));
    // A message (published, or by a script) could not keep its place
    // among the other slots' commands.
    for messaging in [
        cmd(&["PUBLISH", "ch", "m"]),
        cmd(&["SPUBLISH", "a", "m"]),
        cmd(&["EVAL", "return 1", "0"]),
        cmd(&["EVAL", "return 1", "1", "a"]),
    ] {
        let cmds = [
            cmd(&["SET", "a", "1"]),
            messaging.clone(),
            cmd(&["SET", "b", "2"]),
        ];
        assert!(plan(&cmds).unwrap().expect("two slots").effects, "{messaging:?}");
        assert_eq!(
            plan(&[cmd(&["SET", "a", "1"]), messaging]),
            Ok(None),
            "one slot: as usual"
        );
    }
    let plain = [
        cmd(&["SET", "a", "1"]),
        cmd(&["LMPOP", "0", "LEFT"]),
        cmd(&["SET", "b", "2"]),
    ];
    assert!(!plan(&plain).unwrap().expect("two slots").effects);
}

#[test]
fn djangos_set_many_runs_as_one_transaction_per_slot() {
    assert_ne!(slot::slot(b"a"), slot::slot(b"b"));
    let cmds = [
        cmd(&["MSET", "a", "1", "b", "2"]),
        cmd(&["EXPIRE", "a", "60"]),
        cmd(&["PING"]),
        cmd(&["EXPIRE", "b", "60"]),
    ];
    let plan = plan(&cmds).unwrap().expect("two slots");
    assert_eq!(
        plan.groups,
        vec![
            (
                slot::slot(b"a"),
                vec![
                    cmd(&["MSET", "a", "1"]),
                    cmd(&["EXPIRE", "a", "60"]),
                    cmd(&["PING"])
                ]
            ),
            (
                slot::slot(b"b"),
                vec![cmd(&["MSET", "b", "2"]), cmd(&["EXPIRE", "b", "60"])]
            ),
        ]
    );
    let replies = [
        vec![b("+OK\r\n"), b(":1\r\n"), b("+PONG\r\n")],
        vec![b("+OK\r\n"), b(":0\r\n")],
    ];
    assert_eq!(merge(&plan, &replies, 2), b("*4\r\n+OK\r\n:1\r\n+PONG\r\n:0\r\n"));
    // A piece's error is the command's reply; the others' stand.
    let replies = [
        vec![b("-OOM command not allowed\r\n"), b(":1\r\n"), b("+PONG\r\n")],
        vec![b("+OK\r\n"), b(":1\r\n")],
    ];
    assert_eq!(
        merge(&plan, &replies, 2),
        b("*4\r\n-OOM command not allowed\r\n:1\r\n+PONG\r\n:1\r\n")
    );
}

#[test]
fn split_reads_and_counts_come_back_in_key_order() {
    let cmds = [cmd(&["MGET", "a", "b", "{a}x"]), cmd(&["DEL", "a", "b"])];
    let plan = plan(&cmds).unwrap().expect("two slots");
    let (sa, sb) = (slot::slot(b"a"), slot::slot(b"b"));
    assert_eq!(plan.groups[0].0, sa);
    assert_eq!(
        plan.groups[0].1,
        vec![cmd(&["MGET", "a", "{a}x"]), cmd(&["DEL", "a"])]
    );
    assert_eq!(
        plan.groups[1],
        (sb, vec![cmd(&["MGET", "b"]), cmd(&["DEL", "b"])])
    );
    let replies = [
        vec![b("*2\r\n$1\r\n1\r\n$-1\r\n"), b(":1\r\n")],
        vec![b("*1\r\n$1\r\n2\r\n"), b(":1\r\n")],
    ];
    assert_eq!(
        merge(&plan, &replies, 2),
        b("*2\r\n*3\r\n$1\r\n1\r\n$1\r\n2\r\n$-1\r\n:2\r\n")
    );
    // A reply that is missing (a short EXEC array) is said so, not invented.
    let short = [
        vec![b("*2\r\n$1\r\n1\r\n$-1\r\n")],
        vec![b("*1\r\n$1\r\n2\r\n"), b(":1\r\n")],
    ];
    let merged = merge(&plan, &short, 2);
    assert!(
        String::from_utf8_lossy(&merged).contains("is missing"),
        "{merged:?}"
    );
}

#[test]
fn client_info_tells_whether_the_watched_keys_changed() {
    let clean = b"$60\r\nid=89 addr=127.0.0.1:35828 fd=8 name= age=0 flags=N db=0 sub=0\n\r\n";
    let dirty = b"=64\r\ntxt:id=89 addr=127.0.0.1:35828 fd=8 name= age=0 flags=d db=0 sub=0\n\r\n";
    assert_eq!(watch_dirty(clean), Some(false));
    assert_eq!(watch_dirty(dirty), Some(true));
    // A name with "d" in it is not a flag.
    assert_eq!(watch_dirty(b"$30\r\nid=1 name=d flags=N db=0\n\r\n"), Some(false));
    assert_eq!(watch_dirty(b"-ERR no\r\n"), None);
}
