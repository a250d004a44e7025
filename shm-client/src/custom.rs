//! Application events (SPEC section 13): a component publishes its own signals, orders or
//! fills as a source of kind `custom` into the session's merged stream, next to market data.
//!
//! - **Schema.** A [`Custom`] event is a type name (1 to [`crate::event::TYPE_NAME_LEN`]
//!   characters of `[A-Za-z0-9._-]`) and up to [`crate::event::MAX_CUSTOM_BYTES`] opaque
//!   bytes. Its frame kind is [`crate::Kind::Custom`]; on equal timestamps it sorts after
//!   every market-data kind (Trade > Book > Kline > Custom).
//! - **Sources.** One custom source carries one type, on topic `custom.<type>`
//!   ([`SourceDecl::custom`]); a component that publishes signals and orders declares two
//!   sources. The daemon refuses a custom source with another topic, and a market-data source
//!   on a `custom.` topic.
//! - **No self-delivery.** [`crate::client::Component::events`] skips the frames of the
//!   component's own sources unless it asks for them
//!   ([`crate::consume::Events::receive_own_events`]); other consumers see every event.
//! - **Recorded, replayed and digested** like market data: the frames are ordinary bus frames.
//!
//! ```no_run
//! use aegis_shm_client::client::Component;
//! use aegis_shm_client::protocol::{Role, SourceDecl};
//! use aegis_shm_client::wait::{Backoff, Deadline};
//! use std::time::Duration;
//!
//! // A strategy that reads the bus and publishes `signal` events on topic `custom.signal`.
//! let decl = SourceDecl::custom("strategy-signals", "signal")?;
//! let c = Component::from_env("strategy", Role::Both, vec![decl])?;
//! let mut signals = c.custom_publisher("strategy-signals")?;
//! let events = c.events(Duration::from_secs(30))?; // never yields our own signals
//! c.ready(Duration::from_secs(60))?;
//! let mut wait = Backoff::default();
//! for ev in events {
//!     let ev = ev?;
//!     if ev.event.symbol() == "BTCUSDT" {
//!         // Same event time as the trade that caused it: it sorts right after it.
//!         signals.publish(ev.ts, b"buy 0.01", &mut wait, Deadline::after(Duration::from_secs(5)))?;
//!     }
//! }
//! signals.finish(&mut wait, Deadline::after(Duration::from_secs(5)))?;
//! c.finished()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::event::{Custom, CustomError, TypeName};
use crate::frame::Seq;
use crate::protocol::{SourceDecl, SourceKind};
use crate::spsc::{Producer, PushError};
use crate::wait::{Deadline, WaitStrategy};

/// Why a custom event was not published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The event is refused: more than [`crate::event::MAX_CUSTOM_BYTES`] bytes.
    #[error(transparent)]
    Event(#[from] CustomError),
    /// The ring had no room (now, or by the deadline), or can never hold the frame. Nothing
    /// was published; the caller still has its bytes to try again.
    #[error(transparent)]
    Ring(#[from] PushError<()>),
}

/// The push error without the event (hundreds of bytes), which the caller can make again.
fn without_event(e: PushError<Custom>) -> PublishError {
    PublishError::Ring(match e {
        PushError::Full(_) => PushError::Full(()),
        PushError::Timeout(_) => PushError::Timeout(()),
        PushError::TooLarge {
            stride, capacity, ..
        } => PushError::TooLarge {
            value: (),
            stride,
            capacity,
        },
    })
}

impl SourceDecl {
    /// A source of [`Custom`] events of type `type_name`, on topic `custom.<type>`. Fails on
    /// a bad type name (see [`TypeName::new`]).
    pub fn custom(name: &str, type_name: &str) -> Result<SourceDecl, CustomError> {
        Ok(SourceDecl {
            name: name.to_string(),
            kind: SourceKind::Custom,
            topic: TypeName::new(type_name)?.topic(),
            journal: None,
            recording: None,
        })
    }
}

/// The producer end of one custom source: publishes events of its type, stamped with its
/// topic. Made by [`crate::client::Component::custom_publisher`].
pub struct CustomPublisher {
    producer: Producer,
    topic_id: u32,
    type_name: TypeName,
}

impl CustomPublisher {
    /// Wraps the producer of a custom source whose frames carry `topic_id` and events of
    /// `type_name`.
    pub fn new(producer: Producer, topic_id: u32, type_name: TypeName) -> CustomPublisher {
        CustomPublisher {
            producer,
            topic_id,
            type_name,
        }
    }

    /// The type of the events it publishes.
    pub fn type_name(&self) -> &str {
        self.type_name.as_str()
    }

    /// Publishes an event with event time `ts` (ns since the epoch; never older than the
    /// source's previous event) carrying `bytes`. Returns its source sequence number. Costs a
    /// copy of the bytes into ring memory; the frame is visible to the sequencer at the end
    /// of the producer's batch (one event unless [`Producer::set_batch`] says more) or at
    /// [`CustomPublisher::flush`]. Fails at once on a full ring ([`PushError::Full`]).
    pub fn try_publish(&mut self, ts: u64, bytes: &[u8]) -> Result<Seq, PublishError> {
        let ev = Custom::typed(self.type_name, bytes)?;
        self.producer
            .try_push(ts, self.topic_id, ev)
            .map_err(without_event)
    }

    /// Like [`CustomPublisher::try_publish`], but waits with `wait` for room until
    /// `deadline` ([`PushError::Timeout`]).
    pub fn publish(
        &mut self,
        ts: u64,
        bytes: &[u8],
        wait: &mut impl WaitStrategy,
        deadline: Deadline,
    ) -> Result<Seq, PublishError> {
        let ev = Custom::typed(self.type_name, bytes)?;
        self.producer
            .push(ts, self.topic_id, ev, wait, deadline)
            .map_err(without_event)
    }

    /// Makes the events published so far visible to the sequencer.
    pub fn flush(&mut self) {
        self.producer.flush();
    }

    /// Live: a promise that no event older than `ts` follows, so the merge need not wait for
    /// this source up to `max_lateness` while it is quiet (see [`Producer::heartbeat`]).
    pub fn heartbeat(
        &mut self,
        ts: u64,
        wait: &mut impl WaitStrategy,
        deadline: Deadline,
    ) -> Result<(), PushError<()>> {
        self.producer.heartbeat(ts, wait, deadline)
    }

    /// Ends the source's stream (an EOF frame). The session ends once every source has.
    pub fn finish(
        &mut self,
        wait: &mut impl WaitStrategy,
        deadline: Deadline,
    ) -> Result<(), PushError<()>> {
        self.producer.finish(wait, deadline)
    }

    /// The producer underneath (batching, sequence numbers).
    pub fn producer(&mut self) -> &mut Producer {
        &mut self.producer
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{decode, Event, EventRef, MAX_CUSTOM_BYTES, TYPE_NAME_LEN};
    use crate::segment::HeapRegion;
    use crate::spsc::RingReader;
    use crate::Kind;
    use std::sync::Arc;

    #[test]
    fn published_events_decode_with_their_type_and_bytes() {
        let region = Arc::new(HeapRegion::new(crate::spsc::region_len(4096)));
        let tx = Producer::create(region.clone(), 4096, 1, 0).unwrap();
        let mut rx = RingReader::open(region, Some(1)).unwrap();
        let mut p = CustomPublisher::new(tx, 7, TypeName::new("signal").unwrap());
        assert_eq!(p.try_publish(10, b"buy").unwrap(), 0);
        assert_eq!(p.try_publish(11, b"").unwrap(), 1);
        let big = [0xabu8; MAX_CUSTOM_BYTES + 1];
        assert!(matches!(
            p.try_publish(12, &big),
            Err(PublishError::Event(CustomError::TooManyBytes(n))) if n == MAX_CUSTOM_BYTES + 1
        ));
        // A full ring refuses at once; nothing is published.
        let mut pushed = 2;
        let full = loop {
            match p.try_publish(20, b"x") {
                Ok(_) => pushed += 1,
                Err(e) => break e,
            }
        };
        assert!(
            matches!(full, PublishError::Ring(PushError::Full(()))),
            "{full:?}"
        );
        assert_eq!(pushed, 4096 / 352);
        p.flush();
        for (ts, want) in [(10, &b"buy"[..]), (11, &b""[..])] {
            let f = rx.peek().unwrap().expect("a frame");
            assert_eq!(
                (f.kind(), f.header.ts, f.header.topic_id),
                (Kind::Custom, ts, 7)
            );
            match decode(f.kind(), f.payload).unwrap() {
                EventRef::Custom(c) => {
                    assert_eq!(c.type_name(), "signal");
                    assert_eq!(c.bytes(), want);
                }
                other => panic!("{other:?}"),
            }
            rx.consume();
        }
    }

    #[test]
    fn type_names_are_checked_with_a_clear_error() {
        assert_eq!(TypeName::new(""), Err(CustomError::EmptyTypeName));
        let long = "x".repeat(TYPE_NAME_LEN + 1);
        let e = TypeName::new(&long).unwrap_err();
        assert!(matches!(e, CustomError::TypeNameTooLong { len, .. } if len == TYPE_NAME_LEN + 1));
        assert!(e.to_string().contains("the limit is 32"), "{e}");
        for bad in ["a b", "sig\n", "é", "a/b", "\u{7f}"] {
            let e = TypeName::new(bad).unwrap_err();
            assert!(
                matches!(e, CustomError::BadTypeName { .. }),
                "{bad:?}: {e:?}"
            );
        }
        assert_eq!(
            TypeName::new(&"x".repeat(TYPE_NAME_LEN))
                .unwrap()
                .as_str()
                .len(),
            TYPE_NAME_LEN
        );
        let d = SourceDecl::custom("s", "order.fill").unwrap();
        assert_eq!(
            (d.kind, d.topic.as_str()),
            (SourceKind::Custom, "custom.order.fill")
        );
        assert!(SourceDecl::custom("s", "").is_err());
        assert_eq!(
            crate::event::custom_topic_type("custom.fill")
                .unwrap()
                .as_str(),
            "fill"
        );
        assert!(matches!(
            crate::event::custom_topic_type("trades.BTCUSDT"),
            Err(CustomError::NotCustomTopic(_))
        ));
    }

    /// 16-aligned, as ring memory is.
    #[repr(C, align(16))]
    struct Aligned([u8; 512]);

    #[test]
    fn decode_refuses_custom_payloads_bytecheck_cannot_see() {
        let ev = Custom::new("fill", b"abc").unwrap();
        let mut buf = Aligned([0; 512]);
        let n = crate::event::encode_into(&ev, &mut buf.0).unwrap();
        assert_eq!(n, Custom::ARCHIVED_LEN);
        // 32 bytes of type name, a u16 length, 256 bytes: 352 in a ring with header and padding.
        assert_eq!((n, crate::frame::stride(n)), (290, 352));
        assert!(decode(Kind::Custom, &buf.0[..n]).is_ok());
        // Layout: type name 0..32, len 32..34, bytes 34...
        let mut bad = Aligned(buf.0);
        bad.0[34 + 5] = 1; // a byte past the event's length
        assert!(decode(Kind::Custom, &bad.0[..n]).is_err());
        let mut bad = Aligned(buf.0);
        bad.0[32..34].copy_from_slice(&(MAX_CUSTOM_BYTES as u16 + 1).to_le_bytes());
        assert!(decode(Kind::Custom, &bad.0[..n]).is_err());
        let mut bad = Aligned(buf.0);
        bad.0[1] = b' '; // "f ll"
        assert!(decode(Kind::Custom, &bad.0[..n]).is_err());
        let owned = decode(Kind::Custom, &buf.0[..n]).unwrap().to_owned();
        assert_eq!(owned, crate::event::AnyEvent::Custom(ev));
        assert_eq!(owned.symbol(), "");
    }
}
