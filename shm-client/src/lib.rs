//! # aegis-shm-client
//!
//! Everything a co-located process needs to take part in an Aegis session: the event schema,
//! the frame and segment layouts, the SPSC source ring (producers), the broadcast bus
//! (consumers) and the wait strategies.
//!
//! ## Lifecycle
//! 1. **Setup.** The daemon creates the session's segments in `/dev/shm` (`aegis-<sid>-src-<name>`,
//!    `aegis-<sid>-bus`). A producer opens its source ring with [`spsc::Producer::open`]; a
//!    consumer attaches to the bus with [`spmc::BusReader::attach`]. Opening checks magic, layout
//!    version, session epoch, initialisation and size, and fails with a specific
//!    [`segment::OpenError`].
//! 2. **Publish.** [`spsc::Producer::try_push`] serialises an event with rkyv straight into
//!    ring memory (claim, write, commit) and hands the event back if the ring is full;
//!    [`spsc::Producer::push`] waits with a [`wait::WaitStrategy`] until a deadline. Commits are
//!    batched: the cursor is published once per batch, or on [`spsc::Producer::flush`].
//!    A component's own application events (signals, orders, fills) are sources of kind
//!    `custom`: [`client::Component::custom_publisher`] publishes them (see [`custom`]).
//! 3. **Consume.** [`spmc::BusReader::try_next`] returns the next frame in bus order, read in
//!    place; [`event::decode`] gives the archived event, validated by bytecheck (or
//!    [`event::decode_unchecked`] on the opt-in fast path). The common loop is one `for`:
//!    [`client::Component::events`] yields native copies ([`consume::Delivered`]), ends at
//!    END-OF-STREAM, and reports a stop, an eviction or a silent bus as an error item.
//!    It skips the events of the component's own sources (no self-delivery) unless asked
//!    ([`consume::Events::receive_own_events`]).
//! 4. **Shutdown.** The producer ends its stream with [`spsc::Producer::finish`] (an EOF
//!    frame); the sequencer writes END-OF-STREAM to the bus once every source has ended; the
//!    consumer sees a frame with the EOF flag and detaches.
//!
//! ## Example (on a heap region, as the unit tests do)
//! ```
//! use aegis_shm_client::event::{decode, Decimal, EventRef, Symbol, Trade};
//! use aegis_shm_client::spsc::{Producer, RingReader};
//! use aegis_shm_client::segment::HeapRegion;
//! use std::sync::Arc;
//!
//! let region = Arc::new(HeapRegion::new(aegis_shm_client::spsc::region_len(4096)));
//! let mut tx = Producer::create(region.clone(), 4096, 1, 0).unwrap();
//! let mut rx = RingReader::open(region, Some(1)).unwrap();
//! let trade = Trade {
//!     symbol: Symbol::new("BTCUSDT").unwrap(),
//!     id: 1,
//!     price: Decimal::parse("63201.05").unwrap(),
//!     qty: Decimal::parse("0.5").unwrap(),
//!     buyer_maker: false,
//! };
//! tx.try_push(1_000, 0, trade).unwrap();
//! tx.flush();
//! let frame = rx.peek().unwrap().expect("one frame");
//! match decode(frame.kind(), frame.payload).unwrap() {
//!     EventRef::Trade(t) => assert_eq!(t.price.to_string(), "63201.05"),
//!     _ => unreachable!(),
//! }
//! ```

//!
//! ## Example: a component that serves requests and consumes the bus
//! A component answers requests from other components ([`client::Component::serve`]) while it
//! reads the bus, and asks others with a deadline ([`client::Component::request`]). Handlers
//! run on the client library's handler thread, never on the reading loop: a slow handler
//! never delays market data. The model and its guarantees are in [`request`].
//! ```no_run
//! use aegis_shm_client::client::Component;
//! use aegis_shm_client::protocol::Role;
//! use aegis_shm_client::request::RequestError;
//! use aegis_shm_client::wait::{Deadline, Park};
//! use serde_json::json;
//! use std::sync::atomic::{AtomicU64, Ordering};
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! // AEGIS_SOCKET and AEGIS_SESSION_TOKEN come from `aegis-shmctl session run`.
//! let c = Component::from_env("risk", Role::Consumer, vec![])?;
//! let events = Arc::new(AtomicU64::new(0));
//! // Answers `aegis-shmctl call SESSION risk seen` and `request("risk", "seen", ...)`.
//! let seen = events.clone();
//! c.serve("seen", move |_req| Ok(json!({ "events": seen.load(Ordering::Relaxed) })));
//! // An error message reaches the caller as `handler_error`.
//! c.serve("fits", |req| {
//!     let qty = req.payload["qty"].as_f64().ok_or("qty must be a number")?;
//!     Ok(json!({ "fits": qty <= 5.0 }))
//! });
//! let mut bus = c.consumer()?;
//! c.ready(Duration::from_secs(60))?;
//! let mut wait = Park::default();
//! loop {
//!     let f = bus.next(&mut wait, Deadline::after(Duration::from_secs(30)))?;
//!     if f.is_eof() {
//!         break;
//!     }
//!     let _event = f.event()?;
//!     events.fetch_add(1, Ordering::Relaxed);
//! }
//! // Ask another component; the answer, an error or `timeout` comes by the deadline.
//! match c.request("portfolio", "positions", json!(null), Duration::from_millis(200)) {
//!     Ok(positions) => println!("positions: {positions}"),
//!     Err(RequestError::Timeout(why)) => eprintln!("portfolio is slow: {why}"),
//!     Err(e) => eprintln!("no positions: {e}"),
//! }
//! c.finished()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

pub mod client;
pub mod consume;
pub mod custom;
pub mod doorbell;
pub mod event;
pub mod frame;
pub mod journal;
pub mod protocol;
pub mod reconcile;
pub mod recording;
pub mod request;
pub(crate) mod ring;
pub mod segment;
pub mod spmc;
pub mod spsc;
pub mod stats;
pub mod subscription;
pub(crate) mod sync;
pub mod wait;

pub use frame::{FrameHeader, Kind, Seq};
