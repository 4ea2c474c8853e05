//! The choreographed saga end to end: all four services in-process against
//! a real nats-server and PostgreSQL. Every test ends by checking the
//! design's invariants.

use shop_integration_tests::shop;
use std::time::Duration;

use shop::{STARTING_CREDIT, Settings, Shop};
use shop_proto::inventory::v1::{
    AddStockRequest, CreateProductRequest, GetProductRequest, ListProductsRequest,
};
use shop_proto::order::v1::{GetOrderRequest, OrderStatus};
use shop_proto::payment::v1::{DepositRequest, GetPaymentRequest, PaymentStatus};
use shop_proto::user::v1::{CreateUserRequest, GetUserRequest, ListUsersRequest};
use tonic::Code;

fn code<T>(result: Result<tonic::Response<T>, tonic::Status>) -> Code {
    result.map(drop).unwrap_err().code()
}

fn steps(order: &shop_proto::order::v1::Order) -> Vec<&str> {
    order.steps.iter().map(|step| step.name.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_purchase_is_confirmed_and_paid() {
    let mut shop = Shop::start(Settings::default()).await;
    let user = shop.create_user("ann@example.com").await;
    shop.create_product("LAMP", 1999, 5).await;
    shop.create_product("MUG", 500, 5).await;

    let order = shop
        .place(&user, &[("LAMP", 2), ("MUG", 1)], "")
        .await
        .unwrap();
    assert_eq!(order.status(), OrderStatus::Pending);
    let order = shop.settled(&order.order_id).await;
    assert_eq!(order.status(), OrderStatus::Confirmed, "{:?}", order.steps);
    assert_eq!(order.total_cents, 2 * 1999 + 500);
    assert_eq!(order.cancel_reason, "");
    // The order service reads `inventory.reserved` and `payment.completed`
    // on durables of their own, so either may be recorded first, and the
    // reservation's record may even come after the confirmation (its
    // durable lagging behind the payment's); the confirmation follows the
    // payment.
    shop::eventually("the reservation recorded on the order", || async {
        shop.order(&order.order_id).await.steps.len() == 4
    })
    .await;
    let order = shop.order(&order.order_id).await;
    let steps = steps(&order);
    let at = |name: &str| steps.iter().position(|step| *step == name);
    assert_eq!(steps.len(), 4, "{steps:?}");
    assert_eq!(at("order.placed"), Some(0), "{steps:?}");
    assert!(at("inventory.reserved").is_some(), "{steps:?}");
    assert!(at("payment.completed").is_some(), "{steps:?}");
    assert!(at("payment.completed") < at("order.confirmed"), "{steps:?}");

    assert_eq!(
        shop.payment_status(&order.order_id).await,
        Some(PaymentStatus::Captured)
    );
    shop::eventually("the lamps are sold", || async {
        shop.product("LAMP").await.sold == 2
    })
    .await;
    let lamp = shop.product("LAMP").await;
    assert_eq!((lamp.available, lamp.reserved, lamp.sold), (3, 0, 2));
    assert_eq!(
        shop.balance(&user).await,
        STARTING_CREDIT - order.total_cents
    );
    shop.check_invariants().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn out_of_stock_and_unknown_skus_cancel_the_order_naming_the_sku() {
    let mut shop = Shop::start(Settings::default()).await;
    let user = shop.create_user("ann@example.com").await;
    shop.create_product("LAMP", 1999, 1).await;

    let order = shop.place(&user, &[("LAMP", 2)], "").await.unwrap();
    let order = shop.settled(&order.order_id).await;
    assert_eq!(order.status(), OrderStatus::Cancelled);
    assert_eq!(
        order.cancel_reason,
        "out of stock: LAMP has 1 available, 2 wanted"
    );
    assert_eq!(
        steps(&order),
        ["order.placed", "inventory.rejected", "order.cancelled"]
    );

    let order = shop
        .place(&user, &[("LAMP", 1), ("NOPE", 1)], "")
        .await
        .unwrap();
    let order = shop.settled(&order.order_id).await;
    assert_eq!(order.status(), OrderStatus::Cancelled);
    assert_eq!(order.cancel_reason, "unknown SKU NOPE");
    // All or none: the lamp that was available was not reserved.
    assert_eq!(shop.product("LAMP").await.available, 1);
    assert_eq!(shop.payment_status(&order.order_id).await, None);
    shop.check_invariants().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn too_little_money_declines_the_payment_and_returns_the_stock() {
    let mut shop = Shop::start(Settings {
        starting_credit: 1000,
        ..Settings::default()
    })
    .await;
    let user = shop.create_user("ann@example.com").await;
    shop.create_product("LAMP", 1999, 3).await;

    let order = shop.place(&user, &[("LAMP", 1)], "").await.unwrap();
    let order = shop.settled(&order.order_id).await;
    assert_eq!(order.status(), OrderStatus::Cancelled);
    assert_eq!(
        order.cancel_reason,
        "insufficient funds: balance 1000 cents, order 1999 cents"
    );
    assert_eq!(
        shop.payment_status(&order.order_id).await,
        Some(PaymentStatus::Declined)
    );
    shop::eventually("the lamp comes back", || async {
        let lamp = shop.product("LAMP").await;
        lamp.available == 3 && lamp.reserved == 0
    })
    .await;
    assert_eq!(shop.balance(&user).await, 1000);

    // A deposit makes the same purchase possible.
    shop.payments()
        .await
        .deposit(DepositRequest {
            user_id: user.clone(),
            amount_cents: 5000,
            idempotency_key: "topup-1".into(),
        })
        .await
        .unwrap();
    shop.deposited(&user, 5000);
    let order = shop.place(&user, &[("LAMP", 1)], "").await.unwrap();
    assert_eq!(
        shop.settled(&order.order_id).await.status(),
        OrderStatus::Confirmed
    );
    shop.check_invariants().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_user_cannot_order() {
    let mut shop = Shop::start(Settings::default()).await;
    shop.create_product("LAMP", 1999, 3).await;
    let stranger = uuid::Uuid::now_v7().to_string();
    let status = shop.place(&stranger, &[("LAMP", 1)], "").await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains(&stranger), "{}", status.message());
    assert_eq!(shop.product("LAMP").await.available, 3);
    shop.check_invariants().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_the_right_code_and_change_nothing() {
    let mut shop = Shop::start(Settings::default()).await;
    let user = shop.create_user("ann@example.com").await;
    shop.create_product("LAMP", 1999, 3).await;
    let mut users = shop.users().await;
    let mut inventory = shop.inventory().await;
    let mut payments = shop.payments().await;
    let mut orders = shop.orders().await;

    for (email, name) in [
        ("not-an-email", "Ann"),
        ("", "Ann"),
        ("bob@example.com", ""),
        ("bob@example.com", &"x".repeat(201)),
        // PostgreSQL stores no NUL in text.
        ("bo\0b@example.com", "Bob"),
        ("bob@example.com", "B\0b"),
    ] {
        let request = CreateUserRequest {
            email: email.into(),
            name: name.into(),
        };
        assert_eq!(
            code(users.create_user(request).await),
            Code::InvalidArgument,
            "{email:?} {name:?}"
        );
    }
    let duplicate = CreateUserRequest {
        email: "ANN@example.com".into(),
        name: "Ann again".into(),
    };
    assert_eq!(
        code(users.create_user(duplicate).await),
        Code::AlreadyExists
    );
    assert_eq!(
        code(
            users
                .get_user(GetUserRequest {
                    user_id: "nope".into()
                })
                .await
        ),
        Code::InvalidArgument
    );
    let unknown = uuid::Uuid::now_v7().to_string();
    assert_eq!(
        code(
            users
                .get_user(GetUserRequest {
                    user_id: unknown.clone()
                })
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            users
                .list_users(ListUsersRequest {
                    page_size: -1,
                    page_token: String::new()
                })
                .await
        ),
        Code::InvalidArgument
    );

    for items in [
        vec![],
        vec![("LAMP", 0)],
        vec![("LAMP", 1001)],
        vec![("", 1)],
        vec![("LA\0MP", 1)],
        vec![("LAMP", 1), ("LAMP", 2)],
    ] {
        let status = shop.place(&user, &items, "").await.unwrap_err();
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{items:?}: {}",
            status.message()
        );
    }
    let many: Vec<(&str, i32)> = vec![("LAMP", 1); 101];
    assert_eq!(
        shop.place(&user, &many, "").await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        shop.place("not-a-uuid", &[("LAMP", 1)], "")
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            orders
                .get_order(GetOrderRequest {
                    order_id: unknown.clone()
                })
                .await
        ),
        Code::NotFound
    );

    let product = |sku: &str, price_cents, stock| CreateProductRequest {
        sku: sku.into(),
        name: "Thing".into(),
        price_cents,
        stock,
    };
    assert_eq!(
        code(inventory.create_product(product("", 1, 1)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(inventory.create_product(product("BAD", -1, 1)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(inventory.create_product(product("BAD", 1, -1)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(inventory.create_product(product("LAMP", 1, 1)).await),
        Code::AlreadyExists
    );
    assert_eq!(
        code(inventory.create_product(product("N\0L", 1, 1)).await),
        Code::InvalidArgument
    );
    let nul_name = CreateProductRequest {
        name: "Th\0ng".into(),
        ..product("NUL", 1, 1)
    };
    assert_eq!(
        code(inventory.create_product(nul_name).await),
        Code::InvalidArgument
    );
    // Past the stated limits (shop_service::limits).
    use shop_service::limits::{MAX_DEPOSIT_CENTS, MAX_PRICE_CENTS, MAX_REQUEST_BYTES, MAX_UNITS};
    for request in [
        product("BIG", MAX_PRICE_CENTS + 1, 1),
        product("BIG", i64::MAX, 1),
        product("BIG", 1, MAX_UNITS + 1),
        product("BIG", 1, i64::MAX),
    ] {
        assert_eq!(
            code(inventory.create_product(request).await),
            Code::InvalidArgument
        );
    }
    for quantity in [i64::MAX, MAX_UNITS + 1, -1, i64::MIN] {
        let status = inventory
            .add_stock(AddStockRequest {
                sku: "LAMP".into(),
                quantity,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }
    // Within the limit alone, past it with what LAMP already has.
    let overflow = inventory
        .add_stock(AddStockRequest {
            sku: "LAMP".into(),
            quantity: MAX_UNITS,
        })
        .await
        .unwrap_err();
    assert_eq!(overflow.code(), Code::OutOfRange, "{overflow:?}");
    assert!(
        overflow.message().contains("stocked with 3 units"),
        "{overflow:?}"
    );
    // A page token is a SKU this service gave out: one that cannot be is
    // refused (found by the fuzz test: NUL reached PostgreSQL, INTERNAL).
    for page_token in ["a\0b", &"x".repeat(65)] {
        let status = inventory
            .list_products(ListProductsRequest {
                page_size: 10,
                page_token: page_token.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }
    // A request past the size limit is refused before any handler runs.
    let huge = CreateProductRequest {
        name: "x".repeat(MAX_REQUEST_BYTES + 1),
        ..product("HUGE", 1, 1)
    };
    let status = inventory.create_product(huge).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert_eq!(
        code(
            inventory
                .add_stock(AddStockRequest {
                    sku: "LAMP".into(),
                    quantity: 0
                })
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            inventory
                .add_stock(AddStockRequest {
                    sku: "NOPE".into(),
                    quantity: 1
                })
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            inventory
                .get_product(GetProductRequest { sku: "NOPE".into() })
                .await
        ),
        Code::NotFound
    );

    let deposit = |user_id: &str, amount_cents| DepositRequest {
        user_id: user_id.into(),
        amount_cents,
        idempotency_key: String::new(),
    };
    for amount in [0, -1, i64::MIN, MAX_DEPOSIT_CENTS + 1, i64::MAX] {
        assert_eq!(
            code(payments.deposit(deposit(&user, amount)).await),
            Code::InvalidArgument,
            "{amount}"
        );
    }
    assert_eq!(
        code(payments.deposit(deposit(&unknown, 10)).await),
        Code::NotFound
    );
    let nul_key = DepositRequest {
        idempotency_key: "k\0".into(),
        ..deposit(&user, 10)
    };
    assert_eq!(code(payments.deposit(nul_key).await), Code::InvalidArgument);
    assert_eq!(
        shop.place(&user, &[("LAMP", 1)], "k\0")
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            payments
                .get_payment(GetPaymentRequest { order_id: unknown })
                .await
        ),
        Code::NotFound
    );

    // Nothing moved.
    assert_eq!(shop.product("LAMP").await.available, 3);
    assert_eq!(shop.balance(&user).await, STARTING_CREDIT);
    shop.check_invariants().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn deposits_stop_at_the_balance_limit_and_a_repeat_past_it_still_answers() {
    use shop_service::limits::{MAX_BALANCE_CENTS, MAX_DEPOSIT_CENTS};
    let mut shop = Shop::start(Settings::default()).await;
    let user = shop.create_user("rich@example.com").await;
    let mut payments = shop.payments().await;
    let deposit = |amount_cents, key: &str| DepositRequest {
        user_id: user.clone(),
        amount_cents,
        idempotency_key: key.into(),
    };
    // Up to just under the limit, in the largest deposits there are.
    let room = MAX_BALANCE_CENTS - STARTING_CREDIT;
    for i in 0..room / MAX_DEPOSIT_CENTS {
        payments
            .deposit(deposit(MAX_DEPOSIT_CENTS, &format!("big-{i}")))
            .await
            .unwrap();
        shop.deposited(&user, MAX_DEPOSIT_CENTS);
    }
    let last = room % MAX_DEPOSIT_CENTS;
    let full = payments
        .deposit(deposit(last, "last"))
        .await
        .unwrap()
        .into_inner();
    shop.deposited(&user, last);
    assert_eq!(full.account.unwrap().balance_cents, MAX_BALANCE_CENTS);

    let status = payments.deposit(deposit(1, "one-more")).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("past the limit"), "{status:?}");
    // The deposit that filled it, repeated, still answers as the first time.
    let again = payments
        .deposit(deposit(last, "last"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.account.unwrap().balance_cents, MAX_BALANCE_CENTS);
    assert_eq!(shop.balance(&user).await, MAX_BALANCE_CENTS);
    shop.check_invariants().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repeated_place_order_returns_the_first_order_and_starts_one_saga() {
    let mut shop = Shop::start(Settings::default()).await;
    let user = shop.create_user("ann@example.com").await;
    shop.create_product("LAMP", 1999, 5).await;

    let first = shop
        .place(&user, &[("LAMP", 1)], "checkout-42")
        .await
        .unwrap();
    let again = shop
        .place(&user, &[("LAMP", 1)], "checkout-42")
        .await
        .unwrap();
    assert_eq!(first.order_id, again.order_id);
    shop.settled(&first.order_id).await;
    let retried = shop
        .place(&user, &[("LAMP", 1)], "checkout-42")
        .await
        .unwrap();
    assert_eq!(retried.order_id, first.order_id);
    assert_eq!(retried.status(), OrderStatus::Confirmed);
    // Deposits are idempotent the same way.
    let mut payments = shop.payments().await;
    for _ in 0..2 {
        payments
            .deposit(DepositRequest {
                user_id: user.clone(),
                amount_cents: 700,
                idempotency_key: "topup".into(),
            })
            .await
            .unwrap();
    }
    shop.deposited(&user, 700);

    // A key names one request: reused for another one it is refused, and
    // nothing is written.
    let other = shop
        .place(&user, &[("LAMP", 2)], "checkout-42")
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::FailedPrecondition, "{other:?}");
    assert!(
        other.message().contains(&first.order_id),
        "{}",
        other.message()
    );
    let other = payments
        .deposit(DepositRequest {
            user_id: user.clone(),
            amount_cents: 5000,
            idempotency_key: "topup".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::FailedPrecondition, "{other:?}");
    assert!(other.message().contains("700 cents"), "{}", other.message());

    // The same key sent eight times at once: one order, one saga.
    let racing =
        futures::future::join_all((0..8).map(|_| shop.place(&user, &[("LAMP", 1)], "checkout-43")))
            .await;
    let ids: std::collections::HashSet<String> = racing
        .into_iter()
        .map(|placed| placed.unwrap().order_id)
        .collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    let raced = ids.into_iter().next().unwrap();
    assert_ne!(raced, first.order_id);
    assert_eq!(shop.settled(&raced).await.status(), OrderStatus::Confirmed);
    shop.check_invariants().await;
    assert_eq!(shop.product("LAMP").await.sold, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_concurrent_orders_for_ten_units_confirm_exactly_ten() {
    let mut shop = Shop::start(Settings::default()).await;
    shop.create_product("LAST", 100, 10).await;
    let mut buyers = Vec::new();
    for i in 0..5 {
        buyers.push(shop.create_user(&format!("buyer{i}@example.com")).await);
    }
    let placed =
        futures::future::join_all((0..50).map(|i| shop.place(&buyers[i % 5], &[("LAST", 1)], "")))
            .await;
    let mut confirmed = 0;
    for order in placed {
        let order = shop.settled(&order.unwrap().order_id).await;
        if order.status() == OrderStatus::Confirmed {
            confirmed += 1;
        } else {
            assert!(
                order.cancel_reason.starts_with("out of stock: LAST"),
                "{}",
                order.cancel_reason
            );
        }
    }
    assert_eq!(confirmed, 10);
    shop.check_invariants().await;
    let last = shop.product("LAST").await;
    assert_eq!((last.available, last.reserved, last.sold), (0, 0, 10));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deadline_that_passes_while_the_payment_is_in_flight_cancels_and_refunds() {
    let deadline = Duration::from_secs(3);
    let mut shop = Shop::start(Settings {
        saga_deadline: deadline,
        ..Settings::default()
    })
    .await;
    let user = shop.create_user("ann@example.com").await;
    shop.create_product("LAMP", 1999, 5).await;

    let order = shop.place(&user, &[("LAMP", 1)], "").await.unwrap();
    // The order service goes away before the capture reaches it.
    shop.stop("order").await;
    shop::eventually("the capture", || async {
        shop.payment_status(&order.order_id).await == Some(PaymentStatus::Captured)
    })
    .await;
    assert_eq!(shop.balance(&user).await, STARTING_CREDIT - 1999);
    tokio::time::sleep(deadline).await;

    shop.restart("order").await;
    let order = shop.settled(&order.order_id).await;
    assert_eq!(order.status(), OrderStatus::Cancelled, "{:?}", order.steps);
    assert_eq!(order.cancel_reason, "timeout");
    shop::eventually("the refund", || async {
        shop.payment_status(&order.order_id).await == Some(PaymentStatus::Refunded)
    })
    .await;
    assert_eq!(shop.balance(&user).await, STARTING_CREDIT);
    shop::eventually("the lamp comes back", || async {
        shop.product("LAMP").await.available == 5
    })
    .await;
    shop.check_invariants().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pending_order_past_its_deadline_is_cancelled() {
    let mut shop = Shop::start(Settings {
        saga_deadline: Duration::from_secs(2),
        ..Settings::default()
    })
    .await;
    let user = shop.create_user("ann@example.com").await;
    shop.create_product("LAMP", 1999, 5).await;
    // Nothing answers the order: the inventory service is down.
    shop.stop("inventory").await;
    let order = shop.place(&user, &[("LAMP", 1)], "").await.unwrap();
    let order = shop.settled(&order.order_id).await;
    assert_eq!(order.status(), OrderStatus::Cancelled);
    assert_eq!(order.cancel_reason, "timeout");

    // When it comes back, the cancellation it finds first leaves a
    // tombstone, or the reservation it made is released: no unit stays held.
    shop.restart("inventory").await;
    shop.check_invariants().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_delivered_twice_has_one_effect() {
    let mut shop = Shop::start(Settings::default()).await;
    let user = shop.create_user("ann@example.com").await;
    shop.create_product("LAMP", 1999, 5).await;
    let order = shop.place(&user, &[("LAMP", 1)], "").await.unwrap();
    let order = shop.settled(&order.order_id).await;
    assert_eq!(order.status(), OrderStatus::Confirmed);

    // Every event of the saga again, under new JetStream message ids so that
    // the broker's de-duplication does not hide them.
    let js = async_nats::jetstream::new(shop.infra.nats.client().await);
    for (stream, subject) in [
        ("USER", "user.created"),
        ("ORDER", "order.placed"),
        ("INVENTORY", "inventory.reserved"),
        ("PAYMENT", "payment.completed"),
        ("ORDER", "order.confirmed"),
    ] {
        let message = js
            .get_stream(stream)
            .await
            .unwrap()
            .get_last_raw_message_by_subject(subject)
            .await
            .unwrap();
        let mut headers = message.headers.clone();
        headers.insert("Nats-Msg-Id", format!("replay-{subject}").as_str());
        js.publish_with_headers(subject, headers, message.payload.clone())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    // Give the copies time to arrive, then nothing may have moved twice.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(shop.balance(&user).await, STARTING_CREDIT - 1999);
    let lamp = shop.product("LAMP").await;
    assert_eq!((lamp.available, lamp.reserved, lamp.sold), (4, 0, 1));
    let order = shop.order(&order.order_id).await;
    assert_eq!(order.status(), OrderStatus::Confirmed);
    assert_eq!(
        order
            .steps
            .iter()
            .filter(|step| step.name == "order.confirmed")
            .count(),
        1
    );
    shop.check_invariants().await;
}

/// A cancellation that overtook its placement, both in one batch of the
/// inventory service's: the cancellation is applied first and leaves a
/// tombstone, so the placement reserves nothing. Neither a reservation
/// and its release, nor a charge and its refund, is ever seen.
#[tokio::test(flavor = "multi_thread")]
async fn a_cancellation_ahead_of_its_placement_in_one_batch_reserves_nothing() {
    use pg_jetstream::envelope::{OutgoingEvent, publish_direct};
    use shop_proto::order::v1::{OrderCancelled, OrderItem, OrderPlaced};

    let mut shop = Shop::start(Settings::default()).await;
    let user = shop.create_user("ann@example.com").await;
    shop.create_product("LAMP", 1999, 5).await;
    // Both events wait in the stream for the inventory service, to be
    // fetched together.
    shop.stop("inventory").await;
    let js = async_nats::jetstream::new(shop.infra.nats.client().await);
    let order_id = uuid::Uuid::now_v7().to_string();
    let cancelled = OrderCancelled {
        order_id: order_id.clone(),
        user_id: user.clone(),
        reason: "timeout".into(),
    };
    let placed = OrderPlaced {
        order_id: order_id.clone(),
        user_id: user.clone(),
        items: vec![OrderItem {
            sku: "LAMP".into(),
            quantity: 2,
        }],
        ..Default::default()
    };
    for event in [
        OutgoingEvent::new(&cancelled).correlated(&order_id),
        OutgoingEvent::new(&placed).correlated(&order_id),
    ] {
        publish_direct(&js, &event, "shop/order").await.unwrap();
    }
    let last = js
        .get_stream("ORDER")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .last_sequence;

    shop.restart("inventory").await;
    shop::eventually("the inventory service acknowledges both", || async {
        // Not found while the service provisions it again.
        let Ok(mut consumer) = js
            .get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
                "inventory",
                "ORDER",
            )
            .await
        else {
            return false;
        };
        consumer
            .info()
            .await
            .is_ok_and(|info| info.ack_floor.stream_sequence >= last)
    })
    .await;
    // Anything it published would have gone out right after its commit.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let inventory = js.get_stream("INVENTORY").await.unwrap();
    for subject in [
        "inventory.reserved",
        "inventory.rejected",
        "inventory.released",
    ] {
        assert!(
            inventory
                .get_last_raw_message_by_subject(subject)
                .await
                .is_err(),
            "the inventory service published {subject}"
        );
    }
    let lamp = shop.product("LAMP").await;
    assert_eq!((lamp.available, lamp.reserved, lamp.sold), (5, 0, 0));
    assert_eq!(shop.payment_status(&order_id).await, None);
    assert_eq!(shop.balance(&user).await, STARTING_CREDIT);
    shop.check_invariants().await;
}
