//! A bounded output buffer for replies: text goes in record by record, and a record that
//! does not fit leaves nothing behind, so a reply is cut only between records.

use std::fmt;

pub struct Out<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl<'a> Out<'a> {
    pub fn new(buf: &'a mut [u8]) -> Out<'a> {
        Out { buf, len: 0 }
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes one record with `write`: false, and nothing of it kept, when it does not
    /// fit in what is left.
    pub fn record(&mut self, write: impl FnOnce(&mut Self) -> fmt::Result) -> bool {
        let mark = self.len;
        if write(self).is_err() {
            self.len = mark;
            return false;
        }
        true
    }
}

impl fmt::Write for Out<'_> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let end = self.len + text.len();
        let room = self.buf.get_mut(self.len..end).ok_or(fmt::Error)?;
        room.copy_from_slice(text.as_bytes());
        self.len = end;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::fmt::Write;

    use super::*;

    #[test]
    fn a_record_that_does_not_fit_leaves_nothing() {
        let mut buf = [0u8; 10];
        let mut out = Out::new(&mut buf);
        assert!(out.record(|out| write!(out, "abc{}", 12)));
        assert!(
            !out.record(|out| write!(out, "defgh{}", 123)),
            "7 bytes, 5 left"
        );
        assert_eq!(out.len(), 5);
        assert!(out.record(|out| out.write_str("vwxyz")), "exactly full");
        assert!(!out.record(|out| out.write_str("!")));
        assert_eq!(&buf, b"abc12vwxyz");
    }
}
