//! ChaCha20-Poly1305 for CPUs with AVX-512 F and BW: ChaCha20 sixteen blocks at once where the
//! data needs that many (one state word of every block per vector, no shuffles in the rounds),
//! else four blocks per vector (rows in the 128-bit lanes, rotations with `vprold`), up to
//! three such groups computed side by side so the vector units have independent chains. The
//! MAC: on CPUs with IFMA in eight vector lanes ([`super::poly_lanes`]), after the keystream
//! where one step makes all of it (up to 1,728 bytes, with rows beside the wide blocks), else
//! absorbed between later steps' rounds, where its work overlaps theirs ("stitched", as
//! ring's AVX2 assembly is); elsewhere as a scalar radix-2^64 Poly1305 stitched one step
//! behind the keystream. Masked byte loads and stores for a tail.
//!
//! Written here because no library offered it (issue 9: ring stops at AVX2; OpenSSL's AVX-512
//! path costs more per call than it saves at WireGuard's sizes; RustCrypto's is slower than
//! ring). Both MAC paths are checked against ring byte for byte by this crate's tests and by
//! the `aead` fuzz target; branches and memory accesses depend on lengths only, never on keys
//! or data.

use std::arch::x86_64::*;
use std::mem::MaybeUninit;

use super::poly::Poly;
use super::poly_lanes::Lanes;

/// "expand 32-byte k".
const SIGMA: [u32; 4] = [0x6170_7865, 0x3320_646e, 0x7962_2d32, 0x6b20_6574];

/// A key for this implementation; only made where the CPU has what it needs.
#[derive(Clone, zeroize::ZeroizeOnDrop)]
pub(super) struct Avx512Key {
    key: [u32; 8],
    /// The CPU has AVX-512 IFMA: Poly1305 runs in eight vector lanes ([`super::poly_lanes`])
    /// instead of the scalar chain, both absorbed between ChaCha20's rounds.
    ifma: bool,
}

impl Avx512Key {
    /// `None` when this CPU lacks AVX-512 F or BW.
    pub(super) fn new(key: &[u8; 32]) -> Option<Self> {
        if !(is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")) {
            return None;
        }
        let mut words = [0u32; 8];
        for (w, c) in words.iter_mut().zip(key.chunks_exact(4)) {
            *w = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        Some(Avx512Key {
            key: words,
            ifma: is_x86_feature_detected!("avx512ifma"),
        })
    }

    /// The same key on the stitched scalar MAC even where the CPU has IFMA, so that tests
    /// check both paths on one machine.
    pub(super) fn without_ifma(mut self) -> Self {
        self.ifma = false;
        self
    }

    /// Whether the eight-lane MAC runs.
    pub(super) fn ifma(&self) -> bool {
        self.ifma
    }

    /// Encrypts `data` in place under WireGuard's nonce for `counter`; returns the tag.
    pub(super) fn seal(&self, counter: u64, data: &mut [u8]) -> [u8; 16] {
        // SAFETY: `new` checked the CPU features each function is compiled for.
        unsafe {
            if self.ifma {
                crypt_lanes(&self.key, counter, data, Pass::Seal(None))
            } else {
                crypt(&self.key, counter, data, Pass::Seal(None))
            }
        }
    }

    /// Encrypts `plaintext` into `data` (of its length); returns the tag. Reading the plaintext
    /// where it lies spares the caller a copy of each packet (~4 % of a seal's time).
    pub(super) fn seal_from(&self, counter: u64, plaintext: &[u8], data: &mut [u8]) -> [u8; 16] {
        assert_eq!(
            plaintext.len(),
            data.len(),
            "sealing into a buffer of another length"
        );
        // SAFETY: as in `seal`.
        unsafe {
            if self.ifma {
                crypt_lanes(&self.key, counter, data, Pass::Seal(Some(plaintext)))
            } else {
                crypt(&self.key, counter, data, Pass::Seal(Some(plaintext)))
            }
        }
    }

    /// Decrypts `data` in place; returns the tag its ciphertext should have carried (the
    /// caller compares, and drops the plaintext on a mismatch).
    pub(super) fn open(&self, counter: u64, data: &mut [u8]) -> [u8; 16] {
        // SAFETY: as in `seal`.
        unsafe {
            if self.ifma {
                crypt_lanes(&self.key, counter, data, Pass::Open)
            } else {
                crypt(&self.key, counter, data, Pass::Open)
            }
        }
    }
}

/// ChaCha20 state rows for four consecutive blocks: each vector holds one row (four words)
/// of each block, block `i` in 128-bit lane `i`.
#[derive(Clone, Copy)]
struct Group([__m512i; 4]);

#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn group(key: &[u32; 8], nonce: [u32; 3], block: u32) -> Group {
    let [n0, n1, n2] = nonce;
    let d = _mm512_setr_epi32(
        block as i32,
        n0 as i32,
        n1 as i32,
        n2 as i32,
        block.wrapping_add(1) as i32,
        n0 as i32,
        n1 as i32,
        n2 as i32,
        block.wrapping_add(2) as i32,
        n0 as i32,
        n1 as i32,
        n2 as i32,
        block.wrapping_add(3) as i32,
        n0 as i32,
        n1 as i32,
        n2 as i32,
    );
    Group([
        row(SIGMA),
        row([key[0], key[1], key[2], key[3]]),
        row([key[4], key[5], key[6], key[7]]),
        d,
    ])
}

/// One row of a group: the same four words in every block.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn row(w: [u32; 4]) -> __m512i {
    _mm512_broadcast_i32x4(_mm_setr_epi32(
        w[0] as i32,
        w[1] as i32,
        w[2] as i32,
        w[3] as i32,
    ))
}

#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn quarter_rounds(s: &mut [__m512i; 4]) {
    let [mut a, mut b, mut c, mut d] = *s;
    a = _mm512_add_epi32(a, b);
    d = _mm512_rol_epi32::<16>(_mm512_xor_si512(d, a));
    c = _mm512_add_epi32(c, d);
    b = _mm512_rol_epi32::<12>(_mm512_xor_si512(b, c));
    a = _mm512_add_epi32(a, b);
    d = _mm512_rol_epi32::<8>(_mm512_xor_si512(d, a));
    c = _mm512_add_epi32(c, d);
    b = _mm512_rol_epi32::<7>(_mm512_xor_si512(b, c));
    *s = [a, b, c, d];
}

/// One column round and one diagonal round (the diagonals lined up by rotating rows 1–3
/// within each block's lane, then rotated back).
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn double_round(s: &mut [__m512i; 4]) {
    quarter_rounds(s);
    s[1] = _mm512_shuffle_epi32::<0x39>(s[1]);
    s[2] = _mm512_shuffle_epi32::<0x4e>(s[2]);
    s[3] = _mm512_shuffle_epi32::<0x93>(s[3]);
    quarter_rounds(s);
    s[1] = _mm512_shuffle_epi32::<0x93>(s[1]);
    s[2] = _mm512_shuffle_epi32::<0x4e>(s[2]);
    s[3] = _mm512_shuffle_epi32::<0x39>(s[3]);
}

/// MAC work done between ChaCha20's double rounds, where it overlaps the rounds' chains.
trait BetweenRounds {
    /// After each of a step's ten double rounds.
    ///
    /// # Safety
    /// The CPU must have what the implementation's work needs.
    unsafe fn after_double_round(&mut self);
}

/// Nothing between the rounds.
struct Nothing;

impl BetweenRounds for Nothing {
    #[inline(always)]
    unsafe fn after_double_round(&mut self) {}
}

/// The scalar chain over the whole 16-byte blocks of `blocks`, a tenth after each double round.
struct ScalarBlocks<'a> {
    poly: &'a mut Poly,
    blocks: std::slice::ChunksExact<'a, u8>,
    per_round: usize,
}

impl<'a> ScalarBlocks<'a> {
    fn new(poly: &'a mut Poly, mac: &'a [u8]) -> Self {
        ScalarBlocks {
            poly,
            blocks: mac.chunks_exact(16),
            per_round: mac.len().div_ceil(16 * 10),
        }
    }
}

impl BetweenRounds for ScalarBlocks<'_> {
    #[inline(always)]
    unsafe fn after_double_round(&mut self) {
        for b in self.blocks.by_ref().take(self.per_round) {
            self.poly.block(b);
        }
    }
}

/// The MAC lanes over `message`'s next whole chunks until `until` are in, spread over the
/// ten double rounds.
struct LaneChunks<'a> {
    lanes: &'a mut Lanes,
    message: &'a [u8],
    until: usize,
    per_round: usize,
}

impl<'a> LaneChunks<'a> {
    fn new(lanes: &'a mut Lanes, message: &'a [u8], until: usize) -> Self {
        let per_round = until.saturating_sub(lanes.absorbed()).div_ceil(10);
        LaneChunks {
            lanes,
            message,
            until,
            per_round,
        }
    }
}

impl BetweenRounds for LaneChunks<'_> {
    #[inline(always)]
    unsafe fn after_double_round(&mut self) {
        for _ in 0..self.per_round {
            if self.lanes.absorbed() < self.until {
                self.lanes.absorb_next(self.message);
            }
        }
    }
}

/// The 20 rounds of `G` groups from block `block` on, side by side (independent chains for
/// the vector units), with `between`'s MAC work after each double round (overlapping); writes
/// the groups' keystream blocks in order to `out`.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn keystream<const G: usize, const N: usize, M: BetweenRounds>(
    key: &[u32; 8],
    n: [u32; 3],
    block: u32,
    between: &mut M,
    out: &mut Stream<N>,
) {
    let groups: [Group; G] = std::array::from_fn(|i| group(key, n, block + 4 * i as u32));
    let mut s: [[__m512i; 4]; G] = std::array::from_fn(|i| groups[i].0);
    for _ in 0..10 {
        for g in s.iter_mut() {
            double_round(g);
        }
        between.after_double_round();
    }
    out.clear();
    for (i, g) in s.iter().enumerate() {
        out.extend(&group_blocks(g, &groups[i]));
    }
}

/// A group's four keystream blocks from its rows after the rounds (`x`) and before them.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn group_blocks(x: &[__m512i; 4], input: &Group) -> [__m512i; 4] {
    let o = &input.0;
    let [a, b, c, d] = [
        _mm512_add_epi32(x[0], o[0]),
        _mm512_add_epi32(x[1], o[1]),
        _mm512_add_epi32(x[2], o[2]),
        _mm512_add_epi32(x[3], o[3]),
    ];
    // Rows to blocks: a 4×4 transpose of 128-bit lanes.
    let t0 = _mm512_shuffle_i32x4::<0x44>(a, b);
    let t1 = _mm512_shuffle_i32x4::<0xee>(a, b);
    let t2 = _mm512_shuffle_i32x4::<0x44>(c, d);
    let t3 = _mm512_shuffle_i32x4::<0xee>(c, d);
    [
        _mm512_shuffle_i32x4::<0x88>(t0, t2),
        _mm512_shuffle_i32x4::<0xdd>(t0, t2),
        _mm512_shuffle_i32x4::<0x88>(t1, t3),
        _mm512_shuffle_i32x4::<0xdd>(t1, t3),
    ]
}

/// One quarter round of the wide layout: words `a`, `b`, `c`, `d` of all sixteen blocks.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn wide_quarter_round(x: &mut [__m512i; 16], a: usize, b: usize, c: usize, d: usize) {
    x[a] = _mm512_add_epi32(x[a], x[b]);
    x[d] = _mm512_rol_epi32::<16>(_mm512_xor_si512(x[d], x[a]));
    x[c] = _mm512_add_epi32(x[c], x[d]);
    x[b] = _mm512_rol_epi32::<12>(_mm512_xor_si512(x[b], x[c]));
    x[a] = _mm512_add_epi32(x[a], x[b]);
    x[d] = _mm512_rol_epi32::<8>(_mm512_xor_si512(x[d], x[a]));
    x[c] = _mm512_add_epi32(x[c], x[d]);
    x[b] = _mm512_rol_epi32::<7>(_mm512_xor_si512(x[b], x[c]));
}

/// Sixteen blocks from `block` on, vector `i` holding word `i` of every block (block
/// `block + j` in 32-bit lane `j`): the rounds need no shuffles and their four quarter rounds
/// are independent chains, so sixteen blocks cost what twelve do in rows (measured: 130 ns
/// each). `G` groups of rows after them (from block `block + 16`) go through their rounds in
/// the same loop, where their single chains hide behind the wide rounds' work: sixteen
/// blocks and two groups took 163 ns, one after the other 253. `between`'s MAC work after
/// each double round, as in [`keystream`]. Writes the blocks in order to `out`.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn wide_keystream<const G: usize, const N: usize, M: BetweenRounds>(
    key: &[u32; 8],
    n: [u32; 3],
    block: u32,
    between: &mut M,
    out: &mut Stream<N>,
) {
    let groups: [Group; G] = std::array::from_fn(|i| group(key, n, block + (WIDE + 4 * i) as u32));
    let mut rows: [[__m512i; 4]; G] = std::array::from_fn(|i| groups[i].0);
    let counters = _mm512_add_epi32(
        _mm512_set1_epi32(block as i32),
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
    );
    let words = [
        SIGMA[0], SIGMA[1], SIGMA[2], SIGMA[3], key[0], key[1], key[2], key[3], key[4], key[5],
        key[6], key[7], 0, n[0], n[1], n[2],
    ];
    let input = |i: usize| {
        if i == 12 {
            counters
        } else {
            _mm512_set1_epi32(words[i] as i32)
        }
    };
    let mut x: [__m512i; 16] = std::array::from_fn(input);
    for _ in 0..10 {
        wide_quarter_round(&mut x, 0, 4, 8, 12);
        wide_quarter_round(&mut x, 1, 5, 9, 13);
        wide_quarter_round(&mut x, 2, 6, 10, 14);
        wide_quarter_round(&mut x, 3, 7, 11, 15);
        wide_quarter_round(&mut x, 0, 5, 10, 15);
        wide_quarter_round(&mut x, 1, 6, 11, 12);
        wide_quarter_round(&mut x, 2, 7, 8, 13);
        wide_quarter_round(&mut x, 3, 4, 9, 14);
        for g in rows.iter_mut() {
            double_round(g);
        }
        between.after_double_round();
    }
    for (i, w) in x.iter_mut().enumerate() {
        *w = _mm512_add_epi32(*w, input(i));
    }
    // Words to blocks, a 16×16 transpose of 32-bit words in three passes: pairs of words,
    // then fours (both within 128-bit lanes, where block j's words sit in lane j / 4), then
    // the 128-bit lanes themselves.
    let mut pairs = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        pairs[2 * i] = _mm512_unpacklo_epi32(x[2 * i], x[2 * i + 1]);
        pairs[2 * i + 1] = _mm512_unpackhi_epi32(x[2 * i], x[2 * i + 1]);
    }
    // fours[4 * q + k]: words 4q..4q + 3 of block 4 * lane + k, in each 128-bit lane.
    let mut fours = [_mm512_setzero_si512(); 16];
    for q in 0..4 {
        let (lo, hi) = (pairs[4 * q], pairs[4 * q + 1]);
        let (lo2, hi2) = (pairs[4 * q + 2], pairs[4 * q + 3]);
        fours[4 * q] = _mm512_unpacklo_epi64(lo, lo2);
        fours[4 * q + 1] = _mm512_unpackhi_epi64(lo, lo2);
        fours[4 * q + 2] = _mm512_unpacklo_epi64(hi, hi2);
        fours[4 * q + 3] = _mm512_unpackhi_epi64(hi, hi2);
    }
    let mut blocks = [_mm512_setzero_si512(); WIDE];
    for k in 0..4 {
        let [a, b, c, d] = [fours[k], fours[4 + k], fours[8 + k], fours[12 + k]];
        let t0 = _mm512_shuffle_i32x4::<0x44>(a, b);
        let t1 = _mm512_shuffle_i32x4::<0xee>(a, b);
        let t2 = _mm512_shuffle_i32x4::<0x44>(c, d);
        let t3 = _mm512_shuffle_i32x4::<0xee>(c, d);
        blocks[k] = _mm512_shuffle_i32x4::<0x88>(t0, t2);
        blocks[4 + k] = _mm512_shuffle_i32x4::<0xdd>(t0, t2);
        blocks[8 + k] = _mm512_shuffle_i32x4::<0x88>(t1, t3);
        blocks[12 + k] = _mm512_shuffle_i32x4::<0xdd>(t1, t3);
    }
    out.clear();
    out.extend(&blocks);
    for (i, g) in rows.iter().enumerate() {
        out.extend(&group_blocks(g, &groups[i]));
    }
}

/// XORs keystream blocks over `data` (up to 64 bytes per block; a short tail is masked), or
/// over `from` (of `data`'s length) into `data`.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn xor_blocks(blocks: &[__m512i], data: &mut [u8], from: Option<&[u8]>) {
    let len = data.len();
    let dst = data.as_mut_ptr();
    let src = match from {
        Some(from) => {
            assert_eq!(from.len(), len, "XOR from a buffer of another length");
            from.as_ptr()
        }
        None => dst.cast_const(),
    };
    for (i, k) in blocks.iter().enumerate().take(len.div_ceil(64)) {
        // SAFETY: block `i` starts below `len`, in `data` and in `from` alike; the short
        // last one is masked to the bytes that remain.
        let (p, q, n) = (dst.add(64 * i), src.add(64 * i), (len - 64 * i).min(64));
        if n == 64 {
            let v = _mm512_loadu_si512(q as *const _);
            _mm512_storeu_si512(p as *mut _, _mm512_xor_si512(v, *k));
        } else {
            let mask = (1u64 << n) - 1;
            let v = _mm512_maskz_loadu_epi8(mask, q as *const i8);
            _mm512_mask_storeu_epi8(p as *mut i8, mask, _mm512_xor_si512(v, *k));
        }
    }
}

/// What a call does: seal (the plaintext in the data buffer itself, or read from another of
/// its length) or open (in place).
#[derive(Clone, Copy)]
enum Pass<'a> {
    Seal(Option<&'a [u8]>),
    Open,
}

impl<'a> Pass<'a> {
    fn sealing(self) -> bool {
        matches!(self, Pass::Seal(_))
    }

    /// Where the plaintext of `data[range]` lies when sealed from elsewhere.
    fn from(self, range: std::ops::Range<usize>) -> Option<&'a [u8]> {
        match self {
            Pass::Seal(Some(from)) => Some(&from[range]),
            _ => None,
        }
    }
}

fn nonce(counter: u64) -> [u32; 3] {
    [0, counter as u32, (counter >> 32) as u32]
}

/// Most groups computed together: 12 blocks, 768 bytes of keystream (four measured no
/// faster: the rounds of three already fill the vector units).
const GROUPS: usize = 3;
/// Blocks of the wide layout ([`wide_keystream`]).
const WIDE: usize = 16;
/// The most blocks one step makes: the wide layout and three groups beside it.
const MOST: usize = WIDE + 4 * GROUPS;
/// The most blocks a step of rows alone makes (all a message of up to 704 bytes needs).
const ROWS: usize = 4 * GROUPS;

/// One step's keystream from block `block` on, for `needed` bytes of it (what the data still
/// needs and, on the first step, Poly1305's key block: [`needed`]): as many groups as the
/// bytes need where three do, else sixteen blocks in the wide layout and, where `beside`, up
/// to three groups with them in one step. Writes the blocks to `out` (long enough for them).
/// A 1420-byte packet takes one step of 16 + 8 blocks beside each
/// other (163 ns of keystream), or 16 then 8 (253 ns), where two steps of three groups took
/// 255: steps one after the other leave room between their rounds for a MAC, one step none.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn step<const N: usize, M: BetweenRounds>(
    key: &[u32; 8],
    n: [u32; 3],
    block: u32,
    needed: usize,
    beside: bool,
    between: &mut M,
    out: &mut Stream<N>,
) {
    if needed > ROWS * 64 {
        let groups = if beside {
            needed.saturating_sub(64 * WIDE).div_ceil(256).min(GROUPS)
        } else {
            0
        };
        match groups {
            0 => wide_keystream::<0, N, _>(key, n, block, between, out),
            1 => wide_keystream::<1, N, _>(key, n, block, between, out),
            2 => wide_keystream::<2, N, _>(key, n, block, between, out),
            _ => wide_keystream::<GROUPS, N, _>(key, n, block, between, out),
        }
        return;
    }
    let groups = needed.div_ceil(256).clamp(1, GROUPS);
    match groups {
        1 => keystream::<1, N, _>(key, n, block, between, out),
        2 => keystream::<2, N, _>(key, n, block, between, out),
        _ => keystream::<GROUPS, N, _>(key, n, block, between, out),
    }
}

/// Keystream bytes a step is to make for `rest` bytes of data: on the `first` step a block
/// more, Poly1305's key.
fn needed(rest: usize, first: bool) -> usize {
    rest + if first { 64 } else { 0 }
}

/// Whether one step of rows makes all the keystream a message of `len` bytes needs.
fn rows_suffice(len: usize) -> bool {
    needed(len, true) <= ROWS * 64
}

/// The data's keystream blocks of a step; on the first step block 0 is Poly1305's key
/// instead, returned as the MAC it starts.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn data_part(step: &[__m512i], first: bool) -> (Option<Poly>, &[__m512i]) {
    if !first {
        return (None, step);
    }
    let mut first_block = [0u8; 64];
    _mm512_storeu_si512(first_block.as_mut_ptr() as *mut _, step[0]);
    (Some(Poly::new(&first_block[..32])), &step[1..])
}

/// Keystream blocks in a buffer that is never cleared: only the blocks written since the
/// last [`Stream::clear`] are read. Clearing room for 28 blocks (twice: a step's and the
/// kept ones) on every call was 2 % of a router's samples (perf, session 10).
struct Stream<const N: usize> {
    blocks: [MaybeUninit<__m512i>; N],
    len: usize,
}

impl<const N: usize> Stream<N> {
    fn new() -> Self {
        Stream {
            blocks: [MaybeUninit::uninit(); N],
            len: 0,
        }
    }

    fn clear(&mut self) {
        self.len = 0;
    }

    /// Appends `blocks` (the buffer must have room: a step never makes more than `N`).
    #[inline(always)]
    fn extend(&mut self, blocks: &[__m512i]) {
        for (slot, b) in self.blocks[self.len..self.len + blocks.len()]
            .iter_mut()
            .zip(blocks)
        {
            slot.write(*b);
        }
        self.len += blocks.len();
    }

    /// The blocks written.
    #[inline(always)]
    fn blocks(&self) -> &[__m512i] {
        // SAFETY: `extend` wrote the first `len` blocks since `clear` last set it to 0.
        unsafe { std::slice::from_raw_parts(self.blocks.as_ptr().cast::<__m512i>(), self.len) }
    }
}

/// Both directions: ChaCha20 over `data` a step at a time ([`step`]), the MAC one step behind
/// over the ciphertext (sealing: the part just encrypted; opening: the part whose XOR waits
/// until its MAC is done, its keystream kept meanwhile). Steps take as many blocks as the
/// data needs: a step of one group costs nearly the time of three (its rounds are one
/// dependency chain), so the 1420-byte packet takes two steps, not six.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn crypt(key: &[u32; 8], counter: u64, data: &mut [u8], pass: Pass) -> [u8; 16] {
    // Buffers only as large as the steps need: short messages (most of them) then do not
    // clear and copy room for sixteen blocks they never use.
    if rows_suffice(data.len()) {
        crypt_in::<ROWS>(key, counter, data, pass)
    } else {
        crypt_in::<WIDE>(key, counter, data, pass)
    }
}

/// [`crypt`] with keystream buffers of `N` blocks, the most one of its steps makes.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn crypt_in<const N: usize>(
    key: &[u32; 8],
    counter: u64,
    data: &mut [u8],
    pass: Pass,
) -> [u8; 16] {
    let sealing = pass.sealing();
    let n = nonce(counter);
    let mut poly = Poly::new(&[0; 32]);
    let mut flat = Stream::<N>::new();
    let mut kept = Stream::<N>::new();
    let (mut behind, mut at, mut block) = (0..0, 0, 0u32);
    loop {
        let mut between = ScalarBlocks::new(&mut poly, &data[behind.clone()]);
        let rest = needed(data.len() - at, at == 0);
        step(key, n, block, rest, false, &mut between, &mut flat);
        let (mac_key, stream) = data_part(flat.blocks(), at == 0);
        if let Some(mac_key) = mac_key {
            poly = mac_key;
        }
        let end = (at + 64 * stream.len()).min(data.len());
        if sealing {
            xor_blocks(stream, &mut data[at..end], pass.from(at..end));
        } else {
            xor_blocks(kept.blocks(), &mut data[behind.clone()], None);
            kept.clear();
            kept.extend(stream);
        }
        behind = at..end;
        at = end;
        block += flat.blocks().len() as u32;
        if at >= data.len() {
            break;
        }
    }
    poly.padded(&data[behind.clone()]);
    if !sealing {
        xor_blocks(kept.blocks(), &mut data[behind], None);
    }
    poly.finish(data.len())
}

/// Both directions with the MAC in eight lanes. Up to 1,728 bytes (a full-size packet) one
/// step makes all the keystream, its wide rounds and rows side by side, and the MAC runs
/// after it (sealing over the ciphertext; opening before any XOR). Longer messages take more
/// steps, the MAC absorbed between the rounds of later ones: sealing, each step's rounds take
/// the chunks already encrypted; opening, the second step's rounds take every chunk and
/// nothing is decrypted before (the first step's keystream is kept meanwhile). The first step
/// makes the MAC's key, so its rounds have nothing to take. One step with the MAC after it
/// beat two with it stitched in: 1420 bytes sealed in 328 ns instead of 370 (opened: 340, 380).
#[target_feature(enable = "avx512f,avx512bw,avx512ifma")]
unsafe fn crypt_lanes(key: &[u32; 8], counter: u64, data: &mut [u8], pass: Pass) -> [u8; 16] {
    // As in `crypt`: buffers only as large as the steps need.
    if rows_suffice(data.len()) {
        crypt_lanes_in::<ROWS>(key, counter, data, pass)
    } else {
        crypt_lanes_in::<MOST>(key, counter, data, pass)
    }
}

/// [`crypt_lanes`] with keystream buffers of `N` blocks, the most one of its steps makes.
#[target_feature(enable = "avx512f,avx512bw,avx512ifma")]
#[inline]
unsafe fn crypt_lanes_in<const N: usize>(
    key: &[u32; 8],
    counter: u64,
    data: &mut [u8],
    pass: Pass,
) -> [u8; 16] {
    let sealing = pass.sealing();
    let n = nonce(counter);
    let mut poly = Poly::new(&[0; 32]);
    let mut lanes: Option<Lanes> = None;
    let mut tag = None;
    let mut flat = Stream::<N>::new();
    let mut kept = (Stream::<N>::new(), 0..0);
    let (mut at, mut block) = (0, 0u32);
    loop {
        let rest = needed(data.len() - at, at == 0);
        match lanes.as_mut() {
            None => step(key, n, block, rest, true, &mut Nothing, &mut flat),
            Some(lanes) => {
                let until = if sealing { at / 128 } else { lanes.chunks() };
                step(
                    key,
                    n,
                    block,
                    rest,
                    true,
                    &mut LaneChunks::new(lanes, data, until),
                    &mut flat,
                )
            }
        }
        let (mac_key, stream) = data_part(flat.blocks(), at == 0);
        if let Some(mac_key) = mac_key {
            poly = mac_key;
            if data.len() >= 128 {
                lanes = Some(Lanes::new(&poly, data.len()));
            }
        }
        let end = (at + 64 * stream.len()).min(data.len());
        if sealing || tag.is_some() {
            xor_blocks(stream, &mut data[at..end], pass.from(at..end));
        } else if at == 0 && end < data.len() {
            kept.0.clear();
            kept.0.extend(stream);
            kept.1 = at..end;
        } else {
            // Opening: this step's rounds took every chunk, or this one step made all the
            // keystream; the MAC is done before any XOR.
            let poly = std::mem::replace(&mut poly, Poly::new(&[0; 32]));
            tag = Some(finish_mac(poly, lanes.as_mut(), data));
            xor_blocks(
                kept.0.blocks(),
                &mut data[std::mem::take(&mut kept.1)],
                None,
            );
            xor_blocks(stream, &mut data[at..end], None);
        }
        at = end;
        block += flat.blocks().len() as u32;
        if at >= data.len() {
            break;
        }
    }
    match tag {
        Some(tag) => tag,
        None => finish_mac(poly, lanes.as_mut(), data),
    }
}

/// The tag of `ciphertext`: the lanes' remaining chunks, their sum into `poly`, the scalar
/// chain over what follows the last whole chunk, the lengths.
#[target_feature(enable = "avx512f,avx512ifma")]
#[inline]
unsafe fn finish_mac(mut poly: Poly, lanes: Option<&mut Lanes>, ciphertext: &[u8]) -> [u8; 16] {
    let mut taken = 0;
    if let Some(lanes) = lanes {
        while lanes.absorbed() < lanes.chunks() {
            lanes.absorb_next(ciphertext);
        }
        lanes.finish(&mut poly);
        taken = 128 * lanes.chunks();
    }
    poly.padded(&ciphertext[taken..]);
    poly.finish(ciphertext.len())
}
