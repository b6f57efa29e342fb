//! The host side's failure paths: whatever B does wrong, A is told to abort.

use super::*;
use std::collections::VecDeque;

/// A Keel that answers from a script and records what it was asked.
struct Scripted {
    replies: VecDeque<Result<String>>,
    asked: Vec<String>,
}

impl Scripted {
    fn new(replies: Vec<Result<&str>>) -> Self {
        Self {
            replies: replies.into_iter().map(|r| r.map(String::from)).collect(),
            asked: Vec::new(),
        }
    }
}

impl Channel for Scripted {
    fn ask(&mut self, command: &str) -> Result<String> {
        self.asked
            .push(command.split(' ').next().unwrap_or("").to_string());
        self.replies
            .pop_front()
            .unwrap_or_else(|| Ok(r#"{"ok":true}"#.into()))
    }
}

const BEGUN: &str = r#"{"ok":true,"round":0,"pages":1024,"chunk":3072}"#;
const CHUNK: &str = r#"{"ok":true,"offset":0,"round":0,"left":10,"sent":3,"end":0,"crc32":3915708912,"data":"S0VFTA=="}"#;

#[test]
fn b_closing_midway_aborts_on_a() {
    let mut a = Scripted::new(vec![Ok(BEGUN), Ok(CHUNK)]);
    let mut b = Scripted::new(vec![
        Ok(r#"{"ok":true,"id":1}"#),
        Err(anyhow::anyhow!(
            "the control channel closed before Keel replied"
        )),
    ]);
    let e = migrate("counter", &mut a, &mut b, &mut |_| {}).unwrap_err();
    let text = format!("{e:#}");
    assert!(text.contains("the guest runs on at A"), "{text}");
    assert!(text.contains("closed"), "{text}");
    assert_eq!(a.asked, ["migrate-out", "migrate-read", "migrate-abort"]);
}

#[test]
fn b_refusing_the_guest_aborts_on_a() {
    let mut a = Scripted::new(vec![Ok(BEGUN)]);
    let mut b = Scripted::new(vec![Ok(
        r#"{"ok":false,"error":"migrate-in: counter is running here"}"#,
    )]);
    let e = migrate("counter", &mut a, &mut b, &mut |_| {}).unwrap_err();
    assert!(format!("{e:#}").contains("B refused to take the guest"));
    assert_eq!(a.asked, ["migrate-out", "migrate-abort"]);
}

#[test]
fn a_refused_stream_on_b_aborts_both() {
    let mut a = Scripted::new(vec![Ok(BEGUN), Ok(CHUNK)]);
    let mut b = Scripted::new(vec![
        Ok(r#"{"ok":true,"id":1}"#),
        Ok(
            r#"{"ok":false,"error":"migrate-data: checksum mismatch in the page at 0x1000 (corrupted); migration abandoned"}"#,
        ),
    ]);
    let e = migrate("counter", &mut a, &mut b, &mut |_| {}).unwrap_err();
    let text = format!("{e:#}");
    assert!(text.contains("checksum mismatch"), "{text}");
    assert_eq!(b.asked, ["migrate-in", "migrate-data", "migrate-abort"]);
    assert_eq!(a.asked.last().map(String::as_str), Some("migrate-abort"));
}

#[test]
fn a_damaged_line_is_sent_again_and_goes_on() {
    let end = r#"{"ok":true,"offset":4,"round":0,"left":0,"sent":1,"end":0,"crc32":0,"data":""}"#;
    let mut a = Scripted::new(vec![
        Ok(BEGUN),
        Ok(CHUNK),
        Ok(end),
        Err(anyhow::anyhow!("stop here")),
    ]);
    let mut b = Scripted::new(vec![
        Ok(r#"{"ok":true,"id":1}"#),
        Ok(r#"{"ok":false,"error":"migrate-data: not base64"}"#),
        Ok(r#"{"ok":false,"error":"Amigrate-data: unknown command"}"#),
        Ok(r#"{"ok":true,"received":4}"#),
    ]);
    let e = migrate("counter", &mut a, &mut b, &mut |_| {}).unwrap_err();
    assert!(format!("{e:#}").contains("stop here"), "{e:#}");
    assert_eq!(
        b.asked,
        [
            "migrate-in",
            "migrate-data",
            "migrate-data",
            "migrate-data",
            "migrate-abort"
        ]
    );
    assert_eq!(
        a.asked[..4],
        [
            "migrate-out",
            "migrate-read",
            "migrate-read",
            "migrate-next"
        ]
    );
}
