//! A byte cursor that turns fuzz input into choices, and its inverse for writing seeds.
//!
//! libFuzzer mutates bytes; the structure-aware targets read those bytes as a sequence of
//! small decisions (an operation, a length, a payload). [`Choices`] never fails: once the
//! input runs out every read returns zero/empty, so any byte string is a valid input and the
//! fuzzer never wastes time on rejected ones. [`Writer`] writes the same encoding, so seed
//! generators can spell out a meaningful input field by field instead of as magic bytes.

/// Reads decisions from fuzz input. Exhausted input reads as zeros.
#[derive(Debug, Clone)]
pub struct Choices<'a> {
    data: &'a [u8],
}

impl<'a> Choices<'a> {
    pub fn new(data: &'a [u8]) -> Choices<'a> {
        Choices { data }
    }

    /// True once every byte has been read.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    pub fn bool(&mut self) -> bool {
        self.byte() & 1 == 1
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    /// One of `n` choices (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            usize::from(self.byte()) % n
        }
    }

    pub fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        for b in &mut out {
            *b = self.byte();
        }
        out
    }

    /// A payload written by [`Writer::bytes`]: a little-endian u16 length, then that many bytes
    /// (fewer when the input ends first).
    pub fn bytes(&mut self) -> &'a [u8] {
        let len = usize::from(self.u16()).min(self.data.len());
        let (head, rest) = self.data.split_at(len);
        self.data = rest;
        head
    }

    /// Everything not read yet.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }
}

/// Writes the encoding [`Choices`] reads, for seed generators.
#[derive(Debug, Default, Clone)]
pub struct Writer {
    pub out: Vec<u8>,
}

impl Writer {
    pub fn new() -> Writer {
        Writer::default()
    }

    pub fn byte(&mut self, b: u8) -> &mut Writer {
        self.out.push(b);
        self
    }

    pub fn u16(&mut self, v: u16) -> &mut Writer {
        self.out.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u32(&mut self, v: u32) -> &mut Writer {
        self.out.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// A length-prefixed payload; payloads over 65535 bytes are cut (seeds are small).
    pub fn bytes(&mut self, payload: &[u8]) -> &mut Writer {
        let payload = &payload[..payload.len().min(usize::from(u16::MAX))];
        self.u16(payload.len() as u16);
        self.out.extend_from_slice(payload);
        self
    }

    pub fn raw(&mut self, payload: &[u8]) -> &mut Writer {
        self.out.extend_from_slice(payload);
        self
    }

    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_and_reader_agree() {
        let encoded = Writer::new()
            .byte(7)
            .u16(0x1234)
            .u32(0xdead_beef)
            .bytes(b"hello")
            .raw(b"tail")
            .finish();
        let mut c = Choices::new(&encoded);
        assert_eq!(c.byte(), 7);
        assert_eq!(c.u16(), 0x1234);
        assert_eq!(c.u32(), 0xdead_beef);
        assert_eq!(c.bytes(), b"hello");
        assert_eq!(c.rest(), b"tail");
        assert!(c.is_empty());
    }

    #[test]
    fn exhausted_input_reads_as_zero_and_short_payloads_are_cut() {
        let mut c = Choices::new(&[10, 0, 1, 2]);
        assert_eq!(c.bytes(), &[1, 2], "length 10 but only 2 bytes left");
        assert_eq!(c.byte(), 0);
        assert_eq!(c.u32(), 0);
        assert_eq!(c.below(5), 0);
        assert_eq!(c.below(0), 0);
        assert!(c.bytes().is_empty());
    }
}
