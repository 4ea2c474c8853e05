//! The gRPC edge under generated requests: every RPC of the four services
//! is called with requests drawn from seeded strategies (hostile strings:
//! empty, NUL, control and right-to-left characters, emoji, lengths around
//! the limits; numbers at zero, the signs' extremes and the stated limits;
//! ids that are nothing, malformed, unknown or real), against the running
//! services. No answer may be INTERNAL, UNKNOWN or UNAVAILABLE (a bad
//! request is the caller's fault, never the server's); afterwards every
//! service still serves a whole saga, and the design's invariants hold for
//! what the accepted requests did.
//!
//! `FUZZ_CASES` (requests per RPC, default 300) and `FUZZ_SEED` (default 1)
//! choose the run; a failure names both, so it can be run again.

use shop_integration_tests::shop;
use std::collections::HashSet;
use std::fmt::Debug;
use std::future::Future;

use futures::StreamExt as _;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::strategy::ValueTree as _;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use shop::{Settings, Shop};
use shop_proto::inventory::v1::{
    AddStockRequest, CreateProductRequest, GetProductRequest, ListProductsRequest,
};
use shop_proto::order::v1::{
    GetOrderRequest, ListOrdersRequest, OrderItem, OrderStatus, PlaceOrderRequest,
};
use shop_proto::payment::v1::{DepositRequest, GetAccountRequest, GetPaymentRequest};
use shop_proto::user::v1::{CreateUserRequest, GetUserRequest, ListUsersRequest};
use shop_service::limits::{MAX_BALANCE_CENTS, MAX_DEPOSIT_CENTS, MAX_PRICE_CENTS, MAX_UNITS};
use tonic::{Code, Status};

/// How many requests go in flight at once.
const IN_FLIGHT: usize = 8;

fn cases() -> usize {
    shop_test_support::setting("FUZZ_CASES", 300)
}

fn seed() -> u64 {
    shop_test_support::setting("FUZZ_SEED", 1)
}

/// `count` values of `strategy`, the same for the same seed and `rpc`.
fn generate<S: Strategy>(rpc: &str, strategy: S, count: usize) -> Vec<S::Value> {
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed().to_le_bytes());
    for (i, byte) in rpc.bytes().enumerate() {
        bytes[8 + i % 24] ^= byte;
    }
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &bytes),
    );
    (0..count)
        .map(|_| strategy.new_tree(&mut runner).unwrap().current())
        .collect()
}

/// Text a careless or hostile client might send, up to about `max`
/// characters, with lengths around the services' limits.
fn text(max: usize) -> BoxedStrategy<String> {
    let awkward = select(vec![
        'a', 'Z', '0', ' ', '\0', '\t', '\n', '\u{7f}', 'é', 'ß', '😀', '\u{202e}', '\u{feff}',
        '\'', '"', '%', '\\', '_', '-', '.', '@',
    ]);
    prop_oneof![
        Just(String::new()),
        select(vec![
            " ", "\0", "a\0b", "  x  ", "@", "a@b", "a@b.c", "%s%n", "'; --"
        ])
        .prop_map(str::to_owned),
        proptest::collection::vec(awkward, 0..max).prop_map(String::from_iter),
        proptest::collection::vec(any::<char>(), 0..max).prop_map(String::from_iter),
        // Just under, at and over the limits of 64, 200, 254 characters.
        select(vec![63usize, 64, 65, 199, 200, 201, 253, 254, 255]).prop_map(|n| "é".repeat(n)),
    ]
    .boxed()
}

/// Quantities, prices and amounts: anything, and the edges.
fn number() -> BoxedStrategy<i64> {
    prop_oneof![
        any::<i64>(),
        select(vec![
            0,
            1,
            -1,
            1000,
            1001,
            i64::MAX,
            i64::MIN,
            MAX_UNITS,
            MAX_UNITS + 1,
            MAX_PRICE_CENTS,
            MAX_PRICE_CENTS + 1,
            MAX_DEPOSIT_CENTS,
            MAX_DEPOSIT_CENTS + 1,
            MAX_BALANCE_CENTS,
        ]),
        1i64..=10_000,
    ]
    .boxed()
}

fn small_number() -> BoxedStrategy<i32> {
    prop_oneof![
        any::<i32>(),
        select(vec![0, 1, -1, 100, 1000, 1001, i32::MAX, i32::MIN]),
        1i32..=5,
    ]
    .boxed()
}

/// An id field: one that exists, an unknown UUID, or anything at all.
fn id(known: &[String]) -> BoxedStrategy<String> {
    prop_oneof![
        select(known.to_vec()),
        any::<u128>().prop_map(|bits| uuid::Uuid::from_u128(bits).to_string()),
        text(40),
    ]
    .boxed()
}

/// Sends every request, `IN_FLIGHT` at a time, and returns the accepted
/// ones with their answers; panics at any answer a bad request must never
/// get.
async fn call_all<Q, A, F, Fut>(rpc: &str, requests: Vec<Q>, call: F) -> Vec<(Q, A)>
where
    Q: Clone + Debug,
    F: Fn(Q) -> Fut,
    Fut: Future<Output = Result<tonic::Response<A>, Status>>,
{
    let answers: Vec<(Q, Result<tonic::Response<A>, Status>)> = futures::stream::iter(requests)
        .map(|request| {
            let sent = call(request.clone());
            async move { (request, sent.await) }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await;
    let mut accepted = Vec::new();
    for (request, answer) in answers {
        match answer {
            Ok(answer) => accepted.push((request, answer.into_inner())),
            Err(status) => assert!(
                matches!(
                    status.code(),
                    Code::InvalidArgument
                        | Code::NotFound
                        | Code::AlreadyExists
                        | Code::FailedPrecondition
                        | Code::OutOfRange
                ),
                "{rpc} answered {:?} ({}) to {request:?}\nrun again with FUZZ_SEED={} FUZZ_CASES={}",
                status.code(),
                status.message(),
                seed(),
                cases()
            ),
        }
    }
    accepted
}

#[tokio::test(flavor = "multi_thread")]
async fn generated_requests_get_considered_answers_and_leave_the_shop_consistent() {
    let mut shop = Shop::start(Settings::default()).await;
    let n = cases();
    let mut users = Vec::new();
    for i in 0..3 {
        users.push(shop.create_user(&format!("fuzz-{i}@example.com")).await);
    }
    let mut skus = vec!["FUZZ-A".to_owned(), "FUZZ-B".to_owned()];
    shop.create_product("FUZZ-A", 100, 1000).await;
    shop.create_product("FUZZ-B", 7, 1000).await;

    // The user service.
    let client = shop.users().await;
    let made = call_all(
        "CreateUser",
        generate("CreateUser", (text(300), text(300)), n),
        |(email, name)| {
            let mut client = client.clone();
            async move { client.create_user(CreateUserRequest { email, name }).await }
        },
    )
    .await;
    let mut user_ids = users.clone();
    user_ids.extend(
        made.iter()
            .map(|(_, answer)| answer.user.clone().unwrap().user_id),
    );
    call_all(
        "GetUser",
        generate("GetUser", id(&user_ids), n),
        |user_id| {
            let mut client = client.clone();
            async move { client.get_user(GetUserRequest { user_id }).await }
        },
    )
    .await;
    call_all(
        "ListUsers",
        generate("ListUsers", (small_number(), id(&user_ids)), n),
        |(page_size, page_token)| {
            let mut client = client.clone();
            async move {
                client
                    .list_users(ListUsersRequest {
                        page_size,
                        page_token,
                    })
                    .await
            }
        },
    )
    .await;

    // The inventory service: products first, so that the rest may find them.
    let client = shop.inventory().await;
    let created = call_all(
        "CreateProduct",
        generate(
            "CreateProduct",
            (text(80), text(220), number(), number()),
            n,
        ),
        |(sku, name, price_cents, stock)| {
            let mut client = client.clone();
            async move {
                client
                    .create_product(CreateProductRequest {
                        sku,
                        name,
                        price_cents,
                        stock,
                    })
                    .await
            }
        },
    )
    .await;
    for ((sku, _, _, stock), _) in &created {
        shop.product_created(sku, *stock);
        skus.push(sku.clone());
    }
    call_all("GetProduct", generate("GetProduct", id(&skus), n), |sku| {
        let mut client = client.clone();
        async move { client.get_product(GetProductRequest { sku }).await }
    })
    .await;
    let added = call_all(
        "AddStock",
        generate("AddStock", (id(&skus), number()), n),
        |(sku, quantity)| {
            let mut client = client.clone();
            async move { client.add_stock(AddStockRequest { sku, quantity }).await }
        },
    )
    .await;
    for ((sku, quantity), _) in &added {
        shop.stock_added(sku, *quantity);
    }
    call_all(
        "ListProducts",
        generate("ListProducts", (small_number(), id(&skus)), n),
        |(page_size, page_token)| {
            let mut client = client.clone();
            async move {
                client
                    .list_products(ListProductsRequest {
                        page_size,
                        page_token,
                    })
                    .await
            }
        },
    )
    .await;

    // The payment service. Deposits go to the users the invariants follow;
    // a key repeats now and then, so that repeats and misuses come up.
    let client = shop.payments().await;
    call_all(
        "GetAccount",
        generate("GetAccount", id(&user_ids), n),
        |user_id| {
            let mut client = client.clone();
            async move { client.get_account(GetAccountRequest { user_id }).await }
        },
    )
    .await;
    let key = || {
        prop_oneof![
            Just(String::new()),
            select(vec!["k1".to_owned(), "k2".to_owned()]),
            text(220),
        ]
    };
    let deposits = call_all(
        "Deposit",
        generate("Deposit", (id(&users), number(), key()), n),
        |(user_id, amount_cents, idempotency_key)| {
            let mut client = client.clone();
            async move {
                client
                    .deposit(DepositRequest {
                        user_id,
                        amount_cents,
                        idempotency_key,
                    })
                    .await
            }
        },
    )
    .await;
    // A keyed deposit is credited once however often it was accepted.
    let mut credited = HashSet::new();
    for ((user_id, amount, key), _) in &deposits {
        if key.is_empty() || credited.insert((user_id.clone(), key.clone())) {
            shop.deposited(user_id, *amount);
        }
    }

    // The order service.
    let client = shop.orders().await;
    let line = (id(&skus), small_number()).prop_map(|(sku, quantity)| OrderItem { sku, quantity });
    let placed = call_all(
        "PlaceOrder",
        generate(
            "PlaceOrder",
            (id(&users), proptest::collection::vec(line, 0..110), key()),
            n,
        ),
        |(user_id, items, idempotency_key)| {
            let mut client = client.clone();
            async move {
                client
                    .place_order(PlaceOrderRequest {
                        user_id,
                        items,
                        idempotency_key,
                    })
                    .await
            }
        },
    )
    .await;
    let mut order_ids: Vec<String> = placed
        .iter()
        .map(|(_, answer)| answer.order.clone().unwrap().order_id)
        .collect();
    order_ids.push(uuid::Uuid::now_v7().to_string());
    call_all(
        "GetOrder",
        generate("GetOrder", id(&order_ids), n),
        |order_id| {
            let mut client = client.clone();
            async move { client.get_order(GetOrderRequest { order_id }).await }
        },
    )
    .await;
    call_all(
        "ListOrders",
        generate(
            "ListOrders",
            (id(&user_ids), small_number(), id(&order_ids)),
            n,
        ),
        |(user_id, page_size, page_token)| {
            let mut client = client.clone();
            async move {
                client
                    .list_orders(ListOrdersRequest {
                        user_id,
                        page_size,
                        page_token,
                    })
                    .await
            }
        },
    )
    .await;
    let payments = shop.payments().await;
    call_all(
        "GetPayment",
        generate("GetPayment", id(&order_ids), n),
        |order_id| {
            let mut payments = payments.clone();
            async move { payments.get_payment(GetPaymentRequest { order_id }).await }
        },
    )
    .await;

    // Still up, all four: a plain purchase goes through.
    let buyer = shop.create_user("after-fuzz@example.com").await;
    shop.create_product("AFTER", 1, 5).await;
    let order = shop.place(&buyer, &[("AFTER", 1)], "").await.unwrap();
    let order = shop.settled(&order.order_id).await;
    assert_eq!(order.status(), OrderStatus::Confirmed, "{:?}", order.steps);
    shop.check_invariants().await;
}
