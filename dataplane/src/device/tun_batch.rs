//! The TUN thread's batch: the packets of its reads (superpackets split into segments) in
//! buffers that live as long as the thread, handed to the engine when the batch is full or
//! the queue is drained. A superpacket may have more segments than a batch holds (up to
//! 65,535; over 700 in 64 KB at TCP's smallest MSS): the batch is then handed over full and
//! the split goes on into the emptied batch, so no segment is dropped for want of room and
//! no buffer is added.

use crate::offload::{copy_into, Split, SplitError};

/// Packets one TUN thread collects before handing them to the engine (one 64 KiB
/// superpacket of 1380-byte segments is 48).
pub(super) const TUN_BATCH: usize = 128;
/// Free slots a batch keeps before it takes another read: a superpacket of the usual size
/// (64 KB at an MSS of 1,024 or more) then never straddles two batches, so its segments
/// leave as one GSO run.
const READ_ROOM: usize = 64;

/// See the module documentation.
pub(super) struct TunBatch {
    /// Grown to what reads need, then reused (packets are split or copied into them).
    bufs: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    /// Packets in the batch: `bufs[i][..sizes[i]]` for `i < count`.
    count: usize,
}

impl TunBatch {
    pub(super) fn new(slots: usize) -> TunBatch {
        let slots = slots.max(1);
        TunBatch {
            bufs: vec![Vec::new(); slots],
            sizes: vec![0; slots],
            count: 0,
        }
    }

    /// Whether to take another read before handing the batch over.
    pub(super) fn wants_read(&self) -> bool {
        self.count + READ_ROOM.min(self.bufs.len()) <= self.bufs.len()
    }

    /// Adds one read: a bare packet (`offload` false), or a virtio-net header and a packet or
    /// superpacket. Whenever the batch is full with packets of the read still to come, hands
    /// it to `deliver` and goes on; stops when `deliver` returns false (the device is gone).
    /// A malformed read is an error: the packets split from it until then stay in the batch.
    pub(super) fn push(
        &mut self,
        read: &mut [u8],
        offload: bool,
        deliver: &mut impl FnMut(&mut [Vec<u8>], &[usize]) -> bool,
    ) -> Result<(), SplitError> {
        if !offload {
            if self.is_full() && !self.hand_over(deliver) {
                return Ok(());
            }
            copy_into(&mut self.bufs[self.count], read);
            self.sizes[self.count] = read.len();
            self.count += 1;
            return Ok(());
        }
        let mut split = Split::new(read)?;
        loop {
            if self.is_full() && !self.hand_over(deliver) {
                return Ok(());
            }
            let (bufs, sizes) = (&mut self.bufs[self.count..], &mut self.sizes[self.count..]);
            self.count += split.next_into(bufs, sizes)?;
            if split.remaining() == 0 {
                return Ok(());
            }
        }
    }

    /// Hands the packets in the batch to `deliver` (unless there are none) and empties it.
    /// Returns what `deliver` did: false when the device is gone.
    pub(super) fn hand_over(
        &mut self,
        deliver: &mut impl FnMut(&mut [Vec<u8>], &[usize]) -> bool,
    ) -> bool {
        let count = std::mem::take(&mut self.count);
        count == 0 || deliver(&mut self.bufs[..count], &self.sizes[..count])
    }

    fn is_full(&self) -> bool {
        self.count == self.bufs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vnet::{VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, VNET_HDR_LEN};
    use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};
    use tun_rs::VirtioNetHdr;

    /// A TCP/IPv4 read as the kernel hands it over: `segments` × `mss` payload bytes behind
    /// one header, the checksum field holding the pseudo-header sum.
    fn superpacket(mss: u16, segments: usize) -> Vec<u8> {
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
        read
    }

    /// Every packet handed over, as (batch number, TCP sequence number).
    fn sequence_numbers(delivered: &[Vec<Vec<u8>>]) -> Vec<(usize, u32)> {
        let mut out = Vec::new();
        for (batch, packets) in delivered.iter().enumerate() {
            for packet in packets {
                let sliced = SlicedPacket::from_ip(packet).unwrap();
                let Some(TransportSlice::Tcp(tcp)) = sliced.transport else {
                    panic!("not TCP")
                };
                out.push((batch, tcp.sequence_number()));
            }
        }
        out
    }

    /// What one hand-over delivered: each packet's bytes.
    fn copy_out(bufs: &[Vec<u8>], sizes: &[usize]) -> Vec<Vec<u8>> {
        bufs.iter()
            .zip(sizes)
            .map(|(b, s)| b[..*s].to_vec())
            .collect()
    }

    #[test]
    fn a_superpacket_of_more_segments_than_the_batch_is_delivered_whole_in_turns() {
        // MSS 88: 740 segments in one 64 KB superpacket, almost six batches' worth.
        let mut batch = TunBatch::new(TUN_BATCH);
        let mut delivered: Vec<Vec<Vec<u8>>> = Vec::new();
        let mut deliver = |bufs: &mut [Vec<u8>], sizes: &[usize]| {
            delivered.push(copy_out(bufs, sizes));
            true
        };
        assert!(batch.wants_read());
        batch
            .push(&mut superpacket(88, 740), true, &mut deliver)
            .unwrap();
        assert!(
            !batch.wants_read(),
            "100 segments left: no room for another read"
        );
        assert!(batch.hand_over(&mut deliver));
        assert!(batch.wants_read());
        let sizes: Vec<usize> = delivered.iter().map(Vec::len).collect();
        assert_eq!(sizes, [128, 128, 128, 128, 128, 100]);
        let seqs = sequence_numbers(&delivered);
        assert_eq!(seqs.len(), 740, "none dropped");
        for (i, (_, seq)) in seqs.iter().enumerate() {
            assert_eq!(*seq, 1000 + 88 * i as u32, "segment {i} in order");
        }
    }

    #[test]
    fn usual_superpackets_are_not_cut_and_a_stopped_device_stops_the_split() {
        let mut batch = TunBatch::new(TUN_BATCH);
        let mut delivered: Vec<Vec<Vec<u8>>> = Vec::new();
        let mut deliver = |bufs: &mut [Vec<u8>], sizes: &[usize]| {
            delivered.push(copy_out(bufs, sizes));
            true
        };
        // 47 + 47 segments (64 KB at MSS 1380): both fit, then no room for a third.
        for _ in 0..2 {
            assert!(batch.wants_read());
            batch
                .push(&mut superpacket(1380, 47), true, &mut deliver)
                .unwrap();
        }
        assert!(!batch.wants_read());
        assert!(batch.hand_over(&mut deliver));
        assert_eq!(delivered.len(), 1);
        assert_eq!(delivered[0].len(), 94);

        let mut calls = 0;
        let mut gone = |_: &mut [Vec<u8>], _: &[usize]| {
            calls += 1;
            false
        };
        batch
            .push(&mut superpacket(88, 740), true, &mut gone)
            .unwrap();
        assert_eq!(calls, 1, "the split stops at the first refused hand-over");
    }

    #[test]
    fn bare_packets_fill_the_batch_one_each() {
        let mut batch = TunBatch::new(2);
        let mut delivered = Vec::new();
        let mut deliver = |bufs: &mut [Vec<u8>], sizes: &[usize]| {
            delivered.push(
                bufs.iter()
                    .zip(sizes)
                    .map(|(b, s)| b[..*s].to_vec())
                    .collect::<Vec<_>>(),
            );
            true
        };
        for byte in 1..=3u8 {
            batch.push(&mut [byte; 60], false, &mut deliver).unwrap();
        }
        assert!(batch.hand_over(&mut deliver));
        assert_eq!(
            delivered,
            [vec![vec![1; 60], vec![2; 60]], vec![vec![3; 60]]]
        );
    }
}
