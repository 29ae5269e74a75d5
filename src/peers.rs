//! Who a connection is from (its peer, or the client a trusted proxy forwards for) and how many
//! connections each client address holds.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, PoisonError},
};

use axum::http::HeaderMap;
use ipnet::IpNet;

/// The TCP peer of the connection a request came on, put in each request's extensions.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

/// The addresses whose `X-Forwarded-For` is believed: the load balancers in front of the node.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Trusts the given addresses and networks.
    pub fn new(nets: Vec<IpNet>) -> Self {
        Self(nets)
    }

    /// Whether `addr` is one of the proxies.
    pub fn contains(&self, addr: IpAddr) -> bool {
        let addr = canonical(addr);
        self.0.iter().any(|net| net.contains(&addr))
    }

    /// The client a request is from: its peer, unless the peer is a trusted proxy, then the
    /// nearest address in `X-Forwarded-For` that is not itself a trusted proxy (entries further
    /// left were written by the client and prove nothing). A proxy that forwards nothing
    /// readable is the client.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.contains(peer) {
            return canonical(peer);
        }
        let hops = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .map(str::trim)
            .collect::<Vec<_>>();
        let mut client = canonical(peer);
        for hop in hops.into_iter().rev() {
            let Ok(addr) = hop.parse::<IpAddr>() else {
                break;
            };
            client = canonical(addr);
            if !self.contains(client) {
                break;
            }
        }
        client
    }
}

/// An IPv4 address written as IPv6 (`::ffff:a.b.c.d`) is the IPv4 address.
fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// How many connections each client address holds, up to a bound per address.
#[derive(Debug)]
pub struct AddressCounts {
    limit: usize,
    counts: Mutex<HashMap<IpAddr, usize>>,
}

impl AddressCounts {
    /// At most `limit` connections per address.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            counts: Mutex::new(HashMap::new()),
        })
    }

    /// One more connection from `addr`, held until the guard drops; `None` when the address
    /// already holds its most.
    pub fn acquire(self: &Arc<Self>, addr: IpAddr) -> Option<AddressGuard> {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let count = counts.entry(addr).or_insert(0);
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(AddressGuard {
            counts: self.clone(),
            addr,
        })
    }

    fn release(&self, addr: IpAddr) {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = counts.get_mut(&addr) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&addr);
            }
        }
    }
}

/// One connection's place in its address's count.
#[derive(Debug)]
pub struct AddressGuard {
    counts: Arc<AddressCounts>,
    addr: IpAddr,
}

impl Drop for AddressGuard {
    fn drop(&mut self) {
        self.counts.release(self.addr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn forwarded(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
        }
        headers
    }

    #[test]
    fn forwarded_addresses_count_only_behind_a_trusted_proxy() {
        let trusted = TrustedProxies::new(vec!["10.0.0.0/8".parse().unwrap()]);
        let spoofed = forwarded(&["6.6.6.6"]);
        assert_eq!(trusted.client(ip("1.2.3.4"), &spoofed), ip("1.2.3.4"));
        assert_eq!(trusted.client(ip("10.0.0.1"), &spoofed), ip("6.6.6.6"));
        // The client wrote the left entry; the proxies appended the right ones.
        let chain = forwarded(&["6.6.6.6, 5.5.5.5", "10.0.0.2"]);
        assert_eq!(trusted.client(ip("10.0.0.1"), &chain), ip("5.5.5.5"));
        assert_eq!(
            trusted.client(ip("10.0.0.1"), &forwarded(&["junk"])),
            ip("10.0.0.1")
        );
        assert_eq!(
            trusted.client(ip("::ffff:10.0.0.1"), &forwarded(&["::ffff:7.7.7.7"])),
            ip("7.7.7.7")
        );
        let nobody = TrustedProxies::default();
        assert_eq!(nobody.client(ip("10.0.0.1"), &spoofed), ip("10.0.0.1"));
    }

    #[test]
    fn an_address_holds_at_most_its_limit_until_a_guard_drops() {
        let counts = AddressCounts::new(2);
        let a = counts.acquire(ip("1.1.1.1")).unwrap();
        let _b = counts.acquire(ip("1.1.1.1")).unwrap();
        assert!(counts.acquire(ip("1.1.1.1")).is_none());
        assert!(counts.acquire(ip("2.2.2.2")).is_some());
        drop(a);
        assert!(counts.acquire(ip("1.1.1.1")).is_some());
    }
}
