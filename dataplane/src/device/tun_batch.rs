//! The TUN thread's batch: its reads' packets handed to the engine, and the syscalls made
//! once a batch's worth has been handed over or the queue is drained. A superpacket is split
//! where it lies, segment by segment ([`InPlace`]), and handed over as it is split, so no
//! payload is copied on the way to the AEAD; a read of one packet is copied into a buffer of
//! the batch and handed over with the others at the flush — the engine works under its
//! configuration's read lock, which must not be held across a read, and one hold per batch
//! rather than per packet keeps small packets cheap. A superpacket may have more segments
//! than a batch (up to 65,535; over 700 in 64 KB at TCP's smallest MSS): the batch is then
//! flushed full and the split goes on, so no segment is dropped for want of room.

use crate::offload::{copy_into, InPlace, SplitError};

/// Packets one TUN thread hands over between flushes (one 64 KiB superpacket of 1380-byte
/// segments is 48).
pub(super) const TUN_BATCH: usize = 128;
/// Packets a batch still takes before it stops reading: a superpacket of the usual size
/// (64 KB at an MSS of 1,024 or more) then never straddles two flushes, so its segments leave
/// as one GSO run.
const READ_ROOM: usize = 64;

/// Where a batch's packets go.
pub(super) trait Deliver {
    /// One packet at `buf[..len]`; `buf[len..]` ([`PAD_ROOM`](crate::offload::PAD_ROOM) bytes or more) is room it may
    /// write over, the packet itself it must leave as it is.
    fn packet(&mut self, buf: &mut [u8], len: usize);
    /// A read's packets are handed over: the next step is a syscall, so nothing may stay
    /// locked.
    fn read_done(&mut self);
    /// Makes the syscalls for the packets handed over since the last flush; false once the
    /// device is gone.
    fn flush(&mut self) -> bool;
}

/// See the module documentation.
pub(super) struct TunBatch {
    /// Grown to what reads need, then reused (single packets are copied into them).
    bufs: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    /// Packets in `bufs[..copied]`, not handed over yet.
    copied: usize,
    /// Packets handed over since the last flush.
    handed: usize,
}

impl TunBatch {
    pub(super) fn new(slots: usize) -> TunBatch {
        let slots = slots.max(1);
        TunBatch {
            bufs: vec![Vec::new(); slots],
            sizes: vec![0; slots],
            copied: 0,
            handed: 0,
        }
    }

    /// Whether to take another read before flushing.
    pub(super) fn wants_read(&self) -> bool {
        self.held() + READ_ROOM.min(self.bufs.len()) <= self.bufs.len()
    }

    fn held(&self) -> usize {
        self.copied + self.handed
    }

    /// Takes one read, `buf[..len]`: a bare packet (`offload` false), or a virtio-net header
    /// and a packet or superpacket, in which case `buf` must have [`PAD_ROOM`](crate::offload::PAD_ROOM) bytes behind
    /// the read. Whenever the batch is full with packets of the read still to come, flushes
    /// and goes on; stops when the flush finds the device gone. A malformed read is an error:
    /// the packets before it stay in the batch.
    pub(super) fn push(
        &mut self,
        buf: &mut [u8],
        len: usize,
        offload: bool,
        deliver: &mut impl Deliver,
    ) -> Result<(), SplitError> {
        if !offload {
            let packet = buf.get(..len).ok_or(SplitError::TooShort)?;
            self.copy(packet, deliver);
            return Ok(());
        }
        let mut split = InPlace::new(buf, len)?;
        if split.remaining() == 1 {
            if let Some((packet, len)) = split.next_packet() {
                self.copy(&packet[..len], deliver);
            }
            return Ok(());
        }
        // The packets read before go first.
        self.hand_over_copied(deliver);
        while let Some((packet, len)) = split.next_packet() {
            deliver.packet(packet, len);
            self.handed += 1;
            if self.held() == self.bufs.len() && !self.flush(deliver) {
                break;
            }
        }
        deliver.read_done();
        Ok(())
    }

    /// Copies one packet into the batch, flushing a full one first.
    fn copy(&mut self, packet: &[u8], deliver: &mut impl Deliver) {
        if self.held() == self.bufs.len() && !self.flush(deliver) {
            return;
        }
        copy_into(&mut self.bufs[self.copied], packet);
        self.sizes[self.copied] = packet.len();
        self.copied += 1;
    }

    fn hand_over_copied(&mut self, deliver: &mut impl Deliver) {
        let copied = std::mem::take(&mut self.copied);
        for (buf, &len) in self.bufs.iter_mut().zip(&self.sizes).take(copied) {
            deliver.packet(buf, len);
        }
        self.handed += copied;
    }

    /// Hands over what was copied and makes the syscalls for everything handed over (unless
    /// nothing was). Returns what the flush did: false when the device is gone.
    pub(super) fn flush(&mut self, deliver: &mut impl Deliver) -> bool {
        self.hand_over_copied(deliver);
        std::mem::take(&mut self.handed) == 0 || deliver.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offload::PAD_ROOM;
    use crate::vnet::{VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, VNET_HDR_LEN};
    use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};
    use tun_rs::VirtioNetHdr;

    /// A TCP/IPv4 read as the kernel hands it over: `segments` × `mss` payload bytes behind
    /// one header, the checksum field holding the pseudo-header sum; room behind it.
    fn superpacket(mss: u16, segments: usize) -> (Vec<u8>, usize) {
        let payload: Vec<u8> = (0..usize::from(mss) * segments).map(|i| i as u8).collect();
        let mut packet = Vec::new();
        PacketBuilder::ipv4([198, 19, 1, 2], [198, 19, 2, 2], 64)
            .tcp(40000, 5201, 1000, 65535)
            .ack(7)
            .write(&mut packet, &payload)
            .unwrap();
        let hdr = VirtioNetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            gso_type: VIRTIO_NET_HDR_GSO_TCPV4,
            hdr_len: 0,
            gso_size: mss,
            csum_start: 20,
            csum_offset: 16,
        };
        let mut read = vec![0u8; VNET_HDR_LEN];
        hdr.encode(&mut read).unwrap();
        read.extend_from_slice(&packet);
        let len = read.len();
        read.resize(len + PAD_ROOM, 0);
        (read, len)
    }

    /// Records each flush's packets, padding them as the engine does (with garbage, so that a
    /// byte of the next segment not put back shows).
    #[derive(Default)]
    struct Recorder {
        flushed: Vec<Vec<Vec<u8>>>,
        handed: Vec<Vec<u8>>,
        reads_done: usize,
        /// Flushes that find the device gone from this one on.
        gone_after: Option<usize>,
    }

    impl Deliver for Recorder {
        fn packet(&mut self, buf: &mut [u8], len: usize) {
            assert!(buf.len() >= len + PAD_ROOM, "padding room");
            self.handed.push(buf[..len].to_vec());
            buf[len..].fill(0xee);
        }
        fn read_done(&mut self) {
            self.reads_done += 1;
        }
        fn flush(&mut self) -> bool {
            self.flushed.push(std::mem::take(&mut self.handed));
            self.gone_after.is_none_or(|n| self.flushed.len() < n)
        }
    }

    /// Every packet flushed, as (flush number, TCP sequence number).
    fn sequence_numbers(flushed: &[Vec<Vec<u8>>]) -> Vec<(usize, u32)> {
        let mut out = Vec::new();
        for (flush, packets) in flushed.iter().enumerate() {
            for packet in packets {
                let sliced = SlicedPacket::from_ip(packet).unwrap();
                let Some(TransportSlice::Tcp(tcp)) = sliced.transport else {
                    panic!("not TCP")
                };
                assert_eq!(
                    tcp.checksum(),
                    tcp.to_header()
                        .calc_checksum_ipv4(
                            &sliced.net.unwrap().ipv4_ref().unwrap().header().to_header(),
                            tcp.payload()
                        )
                        .unwrap(),
                    "the checksum of each segment"
                );
                out.push((flush, tcp.sequence_number()));
            }
        }
        out
    }

    #[test]
    fn a_superpacket_of_more_segments_than_the_batch_is_delivered_whole_in_turns() {
        // MSS 88: 740 segments in one 64 KB superpacket, almost six batches' worth.
        let mut batch = TunBatch::new(TUN_BATCH);
        let mut to = Recorder::default();
        assert!(batch.wants_read());
        let (mut read, len) = superpacket(88, 740);
        batch.push(&mut read, len, true, &mut to).unwrap();
        assert!(
            !batch.wants_read(),
            "100 segments pending: no room for another read"
        );
        assert!(batch.flush(&mut to));
        assert!(batch.wants_read());
        let sizes: Vec<usize> = to.flushed.iter().map(Vec::len).collect();
        assert_eq!(sizes, [128, 128, 128, 128, 128, 100]);
        assert_eq!(to.reads_done, 1);
        let seqs = sequence_numbers(&to.flushed);
        assert_eq!(seqs.len(), 740, "none dropped");
        for (i, (_, seq)) in seqs.iter().enumerate() {
            assert_eq!(*seq, 1000 + 88 * i as u32, "segment {i} in order");
        }
    }

    #[test]
    fn usual_superpackets_are_not_cut_and_a_stopped_device_stops_the_split() {
        let mut batch = TunBatch::new(TUN_BATCH);
        let mut to = Recorder::default();
        // 47 + 47 segments (64 KB at MSS 1380): both fit, then no room for a third.
        for _ in 0..2 {
            assert!(batch.wants_read());
            let (mut read, len) = superpacket(1380, 47);
            batch.push(&mut read, len, true, &mut to).unwrap();
        }
        assert!(!batch.wants_read());
        assert!(batch.flush(&mut to));
        assert_eq!(to.flushed.len(), 1);
        assert_eq!(to.flushed[0].len(), 94);
        assert_eq!(to.reads_done, 2, "each read ends with nothing held");
        assert!(batch.flush(&mut to), "nothing pending: no flush");
        assert_eq!(to.flushed.len(), 1);

        let mut gone = Recorder {
            gone_after: Some(1),
            ..Recorder::default()
        };
        let (mut read, len) = superpacket(88, 740);
        batch.push(&mut read, len, true, &mut gone).unwrap();
        assert_eq!(
            gone.flushed.len(),
            1,
            "the split stops at the first failed flush"
        );
        assert_eq!(gone.reads_done, 1);
    }

    #[test]
    fn bare_packets_fill_the_batch_one_each() {
        let mut batch = TunBatch::new(2);
        let mut to = Recorder::default();
        for byte in 1..=3u8 {
            batch.push(&mut [byte; 60], 60, false, &mut to).unwrap();
        }
        assert!(batch.flush(&mut to));
        assert_eq!(
            to.flushed,
            [vec![vec![1; 60], vec![2; 60]], vec![vec![3; 60]]]
        );
        assert_eq!(
            to.reads_done, 0,
            "copied packets are handed over at the flush"
        );
    }

    #[test]
    fn packets_keep_the_order_of_their_reads() {
        let mut batch = TunBatch::new(TUN_BATCH);
        let mut to = Recorder::default();
        let (mut one, one_len) = superpacket(1380, 1);
        batch.push(&mut one, one_len, true, &mut to).unwrap();
        assert!(
            to.handed.is_empty(),
            "a single packet is copied, not handed over yet"
        );
        let (mut three, three_len) = superpacket(100, 3);
        batch.push(&mut three, three_len, true, &mut to).unwrap();
        assert_eq!(
            to.handed.len(),
            4,
            "the copied packet goes before the superpacket"
        );
        assert_eq!(to.reads_done, 1);
        let (mut last, last_len) = superpacket(1380, 1);
        batch.push(&mut last, last_len, true, &mut to).unwrap();
        assert!(batch.flush(&mut to));
        let lengths: Vec<usize> = to.flushed[0].iter().map(Vec::len).collect();
        assert_eq!(lengths, [1420, 140, 140, 140, 1420]);
        sequence_numbers(&to.flushed);
    }
}
