//! Metadata contexts (`base:allocation`, `qemu:allocation-depth`) and the queries of
//! `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT` that choose them.
//!
//! A query names a context exactly (`base:allocation`), or, in `LIST` only, a whole
//! namespace (`base:`, `qemu:`); a `LIST` with no query lists every context. Queries that
//! match nothing (another namespace, an unknown name, a namespace in `SET`) select nothing:
//! that is no error. Each context is reported once, however many queries name it.

/// The longest query (and export name) looked at: the protocol's string limit. A longer
/// query matches nothing.
const MAX_STRING: usize = 4096;

/// A metadata context this server reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetaContext {
    /// `base:allocation`: holes and zeroes (`NBD_STATE_HOLE`, `NBD_STATE_ZERO`) as a reader
    /// of the export sees them through the backing chain.
    BaseAllocation,
    /// `qemu:allocation-depth`: which layer of the backing chain holds each extent (0: none,
    /// 1: the export's node, 2: its backing node, ...), as QEMU reports it.
    AllocationDepth,
}

impl MetaContext {
    /// Every context, in the order they are reported.
    pub const ALL: [MetaContext; 2] = [MetaContext::BaseAllocation, MetaContext::AllocationDepth];

    /// The context's name.
    pub fn name(self) -> &'static str {
        match self {
            MetaContext::BaseAllocation => "base:allocation",
            MetaContext::AllocationDepth => "qemu:allocation-depth",
        }
    }

    /// The context's id in `SET_META_CONTEXT` replies and block status chunks.
    pub fn id(self) -> u32 {
        match self {
            MetaContext::BaseAllocation => 1,
            MetaContext::AllocationDepth => 2,
        }
    }

    /// The namespace, with its colon (`base:`).
    fn namespace(self) -> &'static str {
        let name = self.name();
        &name[..=name.find(':').expect("a context name has a namespace")]
    }
}

/// The payload of `LIST_META_CONTEXT` / `SET_META_CONTEXT`: an export name and queries.
#[derive(Debug, PartialEq, Eq)]
pub struct MetaRequest<'a> {
    /// The export the contexts are for.
    pub export: &'a [u8],
    /// The queries, as sent.
    pub queries: Vec<&'a [u8]>,
}

impl<'a> MetaRequest<'a> {
    /// Parses `payload`; `None` if its lengths do not add up to exactly the payload.
    pub fn parse(payload: &'a [u8]) -> Option<MetaRequest<'a>> {
        let (export, mut rest) = take_string(payload)?;
        let count = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
        rest = &rest[4..];
        // Each query takes at least its 4-byte length, so a count beyond that is a lie
        // found before anything is allocated for it.
        if count as usize > rest.len() / 4 {
            return None;
        }
        let mut queries = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let (query, after) = take_string(rest)?;
            queries.push(query);
            rest = after;
        }
        rest.is_empty().then_some(MetaRequest { export, queries })
    }

    /// The contexts the queries choose, each once, in [`MetaContext::ALL`] order: for a
    /// `LIST` (`listing`), namespace queries match their whole namespace and no query
    /// matches everything; for a `SET`, only exact names match.
    pub fn contexts(&self, listing: bool) -> Vec<MetaContext> {
        let chosen = |context: MetaContext| {
            (listing && self.queries.is_empty())
                || self.queries.iter().any(|&query| matches(context, query, listing))
        };
        MetaContext::ALL.into_iter().filter(|&context| chosen(context)).collect()
    }
}

/// Whether `query` chooses `context`.
fn matches(context: MetaContext, query: &[u8], listing: bool) -> bool {
    query.len() <= MAX_STRING
        && (query == context.name().as_bytes()
            || (listing && query == context.namespace().as_bytes()))
}

/// Splits a 32-bit length and that many bytes off the front of `bytes`.
fn take_string(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let length = u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let string = bytes.get(4..4usize.checked_add(length)?)?;
    Some((string, &bytes[4 + length..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(export: &str, queries: &[&str]) -> Vec<u8> {
        let mut bytes = (export.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(export.as_bytes());
        bytes.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for query in queries {
            bytes.extend_from_slice(&(query.len() as u32).to_be_bytes());
            bytes.extend_from_slice(query.as_bytes());
        }
        bytes
    }

    fn contexts(queries: &[&str], listing: bool) -> Vec<MetaContext> {
        MetaRequest::parse(&payload("disk", queries)).unwrap().contexts(listing)
    }

    #[test]
    fn queries_choose_contexts_as_the_protocol_says() {
        use MetaContext::{AllocationDepth as Depth, BaseAllocation as Base};
        assert_eq!(contexts(&[], true), [Base, Depth]);
        assert_eq!(contexts(&[], false), []);
        assert_eq!(contexts(&["base:"], true), [Base]);
        assert_eq!(contexts(&["base:"], false), []);
        assert_eq!(contexts(&["qemu:"], true), [Depth]);
        assert_eq!(contexts(&["qemu:allocation-depth", "base:allocation"], false), [Base, Depth]);
        assert_eq!(contexts(&["base:allocation", "base:allocation"], false), [Base]);
        for nothing in ["base:allocationx", "nbd-server:", "base", "", "x-y:allocation"] {
            assert_eq!(contexts(&[nothing], true), [], "{nothing:?}");
        }
    }

    #[test]
    fn payloads_whose_lengths_do_not_add_up_are_refused() {
        let good = payload("disk", &["base:allocation"]);
        assert_eq!(MetaRequest::parse(&good).unwrap().export, b"disk");
        for cut in 0..good.len() {
            assert!(MetaRequest::parse(&good[..cut]).is_none(), "cut at {cut}");
        }
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(MetaRequest::parse(&trailing).is_none());
        // A count of 4 billion queries in a short payload, a name length that overflows.
        let mut lying = payload("disk", &[]);
        let at = lying.len() - 4;
        lying[at..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(MetaRequest::parse(&lying).is_none());
        assert!(MetaRequest::parse(&[0xff, 0xff, 0xff, 0xff, 0]).is_none());
    }
}
