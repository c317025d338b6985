//! Announcements: how routers learn each other's WireGuard keys over the tailnet. Each router
//! serves its own [`Announcement`] (public key, listen port, direct endpoints, pod CIDRs) by
//! HTTP on its tailnet addresses only, to callers that tailscaled's `whois` names as tagged
//! cluster nodes ([`server`]); each router fetches its peers' announcements from their tailnet
//! addresses ([`fetch`]) and believes a key only from the peer's own tailnet address, and pod
//! CIDRs only as far as Tailscale approved them ([`accept`]).
//!
//! Why over the tailnet: tailscaled authenticates every tailnet packet's source address, so
//! "this answer came from 100.101.1.11" means "from node X", and `whois` turns a caller's
//! address into its node and tags. That binds our key to the Tailscale identity without a
//! Kubernetes API credential on every node (see the reference notes on the options weighed).

pub mod document;
pub mod fetch;
pub mod server;

pub use document::{accept, Accepted, Announcement, AnnouncementError, ANNOUNCEMENT_PATH};

#[cfg(test)]
mod tests {
    //! The server and the client together over loopback, with a fake `whois`.

    use std::collections::BTreeMap;
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use ipnet::IpNet;
    use tailsk8s_dataplane::key::Key;

    use super::fetch::{fetch, fetch_many, FetchError, Target};
    use super::server::{authorize, bind, serve, Caller, Verdict, Whois};
    use super::Announcement;

    const TAG: &str = "tag:k8s-node";

    /// Answers by the caller's IP: a node with tags, unknown, or an error.
    #[derive(Default, Clone)]
    struct FakeWhois {
        nodes: BTreeMap<IpAddr, Result<Vec<&'static str>, String>>,
        in_flight: Arc<AtomicUsize>,
        max_in_flight: Arc<AtomicUsize>,
    }

    impl Whois for FakeWhois {
        async fn whois(&self, addr: SocketAddr) -> Result<Option<Caller>, String> {
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_in_flight.fetch_max(now, Ordering::SeqCst);
            for _ in 0..20 {
                tokio::task::yield_now().await;
            }
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            match self.nodes.get(&addr.ip()) {
                None => Ok(None),
                Some(Err(e)) => Err(e.clone()),
                Some(Ok(tags)) => Ok(Some(Caller {
                    stable_id: format!("n-{}", addr.ip()),
                    tags: tags.iter().map(|t| t.to_string()).collect(),
                })),
            }
        }
    }

    fn lo(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
    }

    fn document() -> Announcement {
        Announcement {
            public_key: Key::generate_private().public_key(),
            listen_port: 51820,
            endpoints: vec!["198.18.0.1:51820".parse().unwrap()],
            pod_cidrs: vec!["198.19.1.0/24".parse::<IpNet>().unwrap()],
        }
    }

    fn fake() -> FakeWhois {
        let mut whois = FakeWhois::default();
        whois.nodes.insert(lo(11), Ok(vec!["tag:other", TAG]));
        whois.nodes.insert(lo(12), Ok(vec!["tag:other"]));
        whois
            .nodes
            .insert(lo(13), Err("tailscaled: connection refused".into()));
        whois
    }

    #[tokio::test]
    async fn authorization_follows_whois() {
        let whois = fake();
        let at = |ip| SocketAddr::new(ip, 40000);
        assert!(
            matches!(authorize(&whois, at(lo(11)), TAG).await, Verdict::Allow(c) if c.stable_id == "n-127.0.0.11")
        );
        assert!(matches!(
            authorize(&whois, at(lo(12)), TAG).await,
            Verdict::Deny(_)
        ));
        assert!(matches!(
            authorize(&whois, at(lo(14)), TAG).await,
            Verdict::Deny(_)
        ));
        assert!(matches!(
            authorize(&whois, at(lo(13)), TAG).await,
            Verdict::Unavailable(_)
        ));
        // The tag must match exactly, not as a prefix.
        assert!(matches!(
            authorize(&whois, at(lo(11)), "tag:k8s").await,
            Verdict::Deny(_)
        ));
    }

    #[tokio::test]
    async fn only_tagged_callers_get_the_document_and_only_on_the_bound_address() {
        let listeners = bind(&[lo(1)], 0).unwrap();
        let port = listeners[0].local_addr().unwrap().port();
        let announcement = document();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            listeners,
            announcement.to_json(),
            fake(),
            TAG.to_string(),
            async move {
                let _ = stop_rx.await;
            },
        ));
        let from = |local: u8| Target {
            peer: SocketAddr::new(lo(1), port),
            local: Some(lo(local)),
        };
        assert_eq!(fetch(from(11)).await.unwrap(), announcement);
        for (caller, status) in [(12, 403), (14, 403), (13, 503)] {
            match fetch(from(caller)).await {
                Err(FetchError::Status { status: s, .. }) => assert_eq!(s, status, "{caller}"),
                other => panic!("caller {caller}: {other:?}"),
            }
        }
        // Bound to 127.0.0.1 only: the same port on another local address is closed.
        let elsewhere = Target {
            peer: SocketAddr::new(lo(2), port),
            local: Some(lo(11)),
        };
        assert!(matches!(
            fetch(elsewhere).await,
            Err(FetchError::Connect { .. })
        ));
        let _ = stop_tx.send(());
        server.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn many_fetches_run_with_bounded_concurrency() {
        let listeners = bind(&[lo(1)], 0).unwrap();
        let port = listeners[0].local_addr().unwrap().port();
        let whois = fake();
        let max = whois.max_in_flight.clone();
        let (_stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve(
            listeners,
            document().to_json(),
            whois,
            TAG.into(),
            async move {
                let _ = stop_rx.await;
            },
        ));
        // Each peer's first address is closed, the second answers.
        let targets: Vec<(usize, Vec<Target>)> = (0..12)
            .map(|i| {
                let at = |ip| Target {
                    peer: SocketAddr::new(ip, port),
                    local: Some(lo(11)),
                };
                (i, vec![at(lo(2)), at(lo(1))])
            })
            .collect();
        let results = fetch_many(targets, 3).await;
        assert_eq!(results.len(), 12);
        assert!(results.iter().all(|(_, r)| r.is_ok()));
        let max = max.load(Ordering::SeqCst);
        assert!((1..=3).contains(&max), "{max} requests in flight at once");
    }
}
