//! Identity and access, tried from outside: the four services in-process
//! against real NATS and PostgreSQL, called with no token, bad tokens, a
//! customer's token on someone else's things and a customer's token on the
//! shop's own business. Each refusal carries the right code, and an
//! administrator's reads afterwards show that nothing was written.

use shop::{STARTING_CREDIT, Settings, Shop};
use shop_auth::{LOCAL_AUDIENCE, LOCAL_ISSUER, LocalIssuer};
use shop_integration_tests::shop;
use shop_proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use shop_proto::inventory::v1::{
    AddStockRequest, CreateProductRequest, GetProductRequest, ListProductsRequest,
};
use shop_proto::order::v1::order_service_client::OrderServiceClient;
use shop_proto::order::v1::{
    GetOrderRequest, ListOrdersRequest, OrderItem, OrderStatus, PlaceOrderRequest,
};
use shop_proto::payment::v1::payment_service_client::PaymentServiceClient;
use shop_proto::payment::v1::{DepositRequest, GetAccountRequest, GetPaymentRequest};
use shop_proto::user::v1::user_service_client::UserServiceClient;
use shop_proto::user::v1::{CreateUserRequest, GetUserRequest, ListUsersRequest};
use tonic::Code;

fn refusal<T: std::fmt::Debug>(
    result: Result<tonic::Response<T>, tonic::Status>,
) -> (Code, String) {
    let status = result.unwrap_err();
    (status.code(), status.message().to_owned())
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn place(user_id: &str) -> PlaceOrderRequest {
    PlaceOrderRequest {
        user_id: user_id.into(),
        items: vec![OrderItem {
            sku: "LAMP".into(),
            quantity: 1,
        }],
        idempotency_key: String::new(),
    }
}

/// Every kind of call the services take, with `token` (or none): all must
/// answer `expected`.
async fn every_call_answers(shop: &Shop, token: Option<&str>, victim: &str, expected: Code) {
    let channel = |service: &'static str| async move {
        match token {
            Some(token) => shop.channel_with(service, token).await,
            None => shop.channel_without_token(service).await,
        }
    };
    let order_id = uuid::Uuid::now_v7().to_string();
    let mut answers: Vec<(&str, Result<(), tonic::Status>)> = Vec::new();
    macro_rules! call {
        ($name:literal, $client:ident, $service:literal, $method:ident, $request:expr) => {{
            let result = $client::new(channel($service).await)
                .$method($request)
                .await
                .map(drop);
            answers.push(($name, result));
        }};
    }
    if expected == Code::Unauthenticated {
        // A customer's CreateUser registers themselves (tested apart).
        call!(
            "CreateUser",
            UserServiceClient,
            "user",
            create_user,
            CreateUserRequest {
                email: "intruder@example.com".into(),
                name: "Intruder".into(),
            }
        );
    }
    call!(
        "GetUser",
        UserServiceClient,
        "user",
        get_user,
        GetUserRequest {
            user_id: victim.into()
        }
    );
    call!(
        "ListUsers",
        UserServiceClient,
        "user",
        list_users,
        ListUsersRequest::default()
    );
    call!(
        "CreateProduct",
        InventoryServiceClient,
        "inventory",
        create_product,
        CreateProductRequest {
            sku: "FREE".into(),
            name: "Free lunch".into(),
            price_cents: 0,
            stock: 1000,
        }
    );
    call!(
        "AddStock",
        InventoryServiceClient,
        "inventory",
        add_stock,
        AddStockRequest {
            sku: "LAMP".into(),
            quantity: 1000,
        }
    );
    call!(
        "PlaceOrder",
        OrderServiceClient,
        "order",
        place_order,
        place(victim)
    );
    call!(
        "ListOrders",
        OrderServiceClient,
        "order",
        list_orders,
        ListOrdersRequest {
            user_id: victim.into(),
            ..Default::default()
        }
    );
    call!(
        "Deposit",
        PaymentServiceClient,
        "payment",
        deposit,
        DepositRequest {
            user_id: victim.into(),
            amount_cents: 9_000_000_000_000_000_000,
            idempotency_key: String::new(),
        }
    );
    call!(
        "GetAccount",
        PaymentServiceClient,
        "payment",
        get_account,
        GetAccountRequest {
            user_id: victim.into()
        }
    );
    if expected == Code::Unauthenticated {
        // Someone else's real order and payment are tried by id apart;
        // an id that names nothing is NOT_FOUND to any valid token.
        call!(
            "GetOrder",
            OrderServiceClient,
            "order",
            get_order,
            GetOrderRequest {
                order_id: order_id.clone()
            }
        );
        call!(
            "GetPayment",
            PaymentServiceClient,
            "payment",
            get_payment,
            GetPaymentRequest { order_id }
        );
        // Reading the catalogue needs a valid token too.
        call!(
            "GetProduct",
            InventoryServiceClient,
            "inventory",
            get_product,
            GetProductRequest { sku: "LAMP".into() }
        );
        call!(
            "ListProducts",
            InventoryServiceClient,
            "inventory",
            list_products,
            ListProductsRequest::default()
        );
    }
    for (name, answer) in answers {
        let status = answer.expect_err(name);
        assert_eq!(status.code(), expected, "{name}: {status:?}");
        assert!(!status.message().is_empty(), "{name} says why");
        if let Some(token) = token {
            assert!(!status.message().contains(token), "{name} echoes the token");
        }
    }
}

/// What an administrator sees: the state that refused calls must not move.
async fn state(shop: &Shop, victim: &str) -> (usize, i64, i64, usize, bool) {
    let users = shop
        .users()
        .await
        .list_users(ListUsersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .users
        .len();
    let balance = shop.balance(victim).await;
    let lamps = shop.product("LAMP").await.available;
    let orders = shop
        .orders()
        .await
        .list_orders(ListOrdersRequest {
            user_id: victim.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .orders
        .len();
    let free = shop
        .inventory()
        .await
        .get_product(GetProductRequest { sku: "FREE".into() })
        .await
        .is_ok();
    (users, balance, lamps, orders, free)
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_without_a_valid_token_are_unauthenticated_and_write_nothing() {
    let mut shop = Shop::start(Settings::default()).await;
    let victim = shop.create_user("victim@example.com").await;
    shop.create_product("LAMP", 1999, 5).await;
    let before = state(&shop, &victim).await;
    assert_eq!(before, (1, STARTING_CREDIT, 5, 0, false));

    let stranger = LocalIssuer::generate();
    let issuer = &shop.infra.issuer;
    let expired = issuer.sign(&serde_json::json!({
        "iss": LOCAL_ISSUER, "aud": LOCAL_AUDIENCE, "sub": "admin", "roles": ["admin"],
        "iat": now() - 7200, "exp": now() - 3600,
    }));
    let other_audience = issuer.sign(&serde_json::json!({
        "iss": LOCAL_ISSUER, "aud": "someone-else", "sub": "admin", "roles": ["admin"],
        "exp": now() + 600,
    }));
    let unsigned = {
        use base64::Engine as _;
        let b64 = |v: serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        format!(
            "{}.{}.",
            b64(serde_json::json!({"alg": "none", "typ": "JWT"})),
            b64(serde_json::json!({
                "iss": LOCAL_ISSUER, "aud": LOCAL_AUDIENCE, "sub": "admin",
                "roles": ["admin"], "exp": now() + 600,
            }))
        )
    };
    every_call_answers(&shop, None, &victim, Code::Unauthenticated).await;
    for token in [
        stranger.admin_token(),
        expired,
        other_audience,
        unsigned,
        "not-a-jwt".to_owned(),
    ] {
        every_call_answers(&shop, Some(&token), &victim, Code::Unauthenticated).await;
    }
    assert_eq!(state(&shop, &victim).await, before);

    // The messages say what is wrong.
    let mut users = UserServiceClient::new(shop.channel_without_token("user").await);
    let (_, message) = refusal(users.list_users(ListUsersRequest::default()).await);
    assert!(message.contains("authorization: Bearer"), "{message}");
    let mut users =
        UserServiceClient::new(shop.channel_with("user", &stranger.admin_token()).await);
    let (_, message) = refusal(users.list_users(ListUsersRequest::default()).await);
    assert!(message.contains("does not trust"), "{message}");

    // Probes stay open.
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        shop.channel_without_token("order").await,
    );
    let serving = health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        serving.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_customer_touches_only_their_own_things_and_none_of_the_shops() {
    let mut shop = Shop::start(Settings::default()).await;
    let victim = shop.create_user("victim@example.com").await;
    let mallory = shop.create_user("mallory@example.com").await;
    shop.create_product("LAMP", 1999, 5).await;
    // The victim has an order and a payment to be curious about.
    let order = shop.place(&victim, &[("LAMP", 1)], "").await.unwrap();
    let order = shop.settled(&order.order_id).await;
    assert_eq!(order.status(), OrderStatus::Confirmed);
    let before = state(&shop, &victim).await;

    let token = shop.infra.issuer.user_token(&mallory);
    every_call_answers(&shop, Some(&token), &victim, Code::PermissionDenied).await;
    // The victim's real order and payment, by id.
    let mut orders = OrderServiceClient::new(shop.channel_with("order", &token).await);
    let (code, message) = refusal(
        orders
            .get_order(GetOrderRequest {
                order_id: order.order_id.clone(),
            })
            .await,
    );
    assert_eq!(code, Code::PermissionDenied, "{message}");
    let mut payments = PaymentServiceClient::new(shop.channel_with("payment", &token).await);
    let (code, _) = refusal(
        payments
            .get_payment(GetPaymentRequest {
                order_id: order.order_id.clone(),
            })
            .await,
    );
    assert_eq!(code, Code::PermissionDenied);
    // Registering again under her own subject adds no one.
    let mut users = UserServiceClient::new(shop.channel_with("user", &token).await);
    let (code, _) = refusal(
        users
            .create_user(CreateUserRequest {
                email: "mallory2@example.com".into(),
                name: "Mallory again".into(),
            })
            .await,
    );
    assert_eq!(code, Code::AlreadyExists);
    // Mallory may not mint money into her own wallet either.
    let (code, message) = refusal(
        payments
            .deposit(DepositRequest {
                user_id: mallory.clone(),
                amount_cents: 1_000_000,
                idempotency_key: String::new(),
            })
            .await,
    );
    assert_eq!(code, Code::PermissionDenied);
    assert!(message.contains("Deposit needs the role"), "{message}");
    assert_eq!(state(&shop, &victim).await, before);
    assert_eq!(shop.balance(&mallory).await, STARTING_CREDIT);

    // Her own things she may see.
    let me = users
        .get_user(GetUserRequest {
            user_id: mallory.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(me.email, "mallory@example.com");
    let account = payments
        .get_account(GetAccountRequest {
            user_id: mallory.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .account
        .unwrap();
    assert_eq!(account.balance_cents, STARTING_CREDIT);
    shop.check_invariants().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_payment_provider_deposits_and_does_nothing_else() {
    let mut shop = Shop::start(Settings::default()).await;
    let ann = shop.create_user("ann@example.com").await;
    let provider = shop.infra.issuer.token(
        "psp",
        &[shop_auth::roles::PAYMENT_PROVIDER],
        std::time::Duration::from_secs(600),
    );
    let mut payments = PaymentServiceClient::new(shop.channel_with("payment", &provider).await);
    let account = payments
        .deposit(DepositRequest {
            user_id: ann.clone(),
            amount_cents: 500,
            idempotency_key: "top-up-1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .account
        .unwrap();
    assert_eq!(account.balance_cents, STARTING_CREDIT + 500);
    shop.deposited(&ann, 500);
    let (code, _) = refusal(
        payments
            .get_account(GetAccountRequest {
                user_id: ann.clone(),
            })
            .await,
    );
    assert_eq!(code, Code::PermissionDenied);
    let mut inventory =
        InventoryServiceClient::new(shop.channel_with("inventory", &provider).await);
    let (code, _) = refusal(
        inventory
            .create_product(CreateProductRequest {
                sku: "X".into(),
                name: "X".into(),
                price_cents: 1,
                stock: 1,
            })
            .await,
    );
    assert_eq!(code, Code::PermissionDenied);
    shop.check_invariants().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_customer_registers_themselves_once_and_buys_with_their_own_token() {
    let mut shop = Shop::start(Settings::default()).await;
    shop.create_product("LAMP", 1999, 5).await;
    // The identity provider gave this person a subject; the shop takes it
    // as their user id.
    let subject = uuid::Uuid::now_v7().to_string();
    let token = shop.infra.issuer.user_token(&subject);
    let mut users = UserServiceClient::new(shop.channel_with("user", &token).await);
    let registered = users
        .create_user(CreateUserRequest {
            email: "self@example.com".into(),
            name: "Self".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(registered.user_id, subject);
    let (code, message) = refusal(
        users
            .create_user(CreateUserRequest {
                email: "other@example.com".into(),
                name: "Again".into(),
            })
            .await,
    );
    assert_eq!(code, Code::AlreadyExists, "{message}");
    // A subject that is no user id cannot register.
    let odd = shop.infra.issuer.user_token("auth0|12345");
    let mut odd_users = UserServiceClient::new(shop.channel_with("user", &odd).await);
    let (code, _) = refusal(
        odd_users
            .create_user(CreateUserRequest {
                email: "odd@example.com".into(),
                name: "Odd".into(),
            })
            .await,
    );
    assert_eq!(code, Code::PermissionDenied);
    shop.registered(&subject).await;

    // The whole saga with the customer's own token: place, then read.
    let mut payments = PaymentServiceClient::new(shop.channel_with("payment", &token).await);
    let order = shop.place(&subject, &[("LAMP", 2)], "mine").await.unwrap();
    let mut orders = OrderServiceClient::new(shop.channel_with("order", &token).await);
    let order = shop::eventually_value("the order settles", || {
        let mut orders = orders.clone();
        let order_id = order.order_id.clone();
        async move {
            let order = orders
                .get_order(GetOrderRequest { order_id })
                .await
                .unwrap()
                .into_inner()
                .order
                .unwrap();
            (order.status() != OrderStatus::Pending).then_some(order)
        }
    })
    .await;
    assert_eq!(order.status(), OrderStatus::Confirmed, "{:?}", order.steps);
    let listed = orders
        .list_orders(ListOrdersRequest {
            user_id: subject.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .orders;
    assert_eq!(listed.len(), 1);
    let paid = payments
        .get_payment(GetPaymentRequest {
            order_id: order.order_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .payment
        .unwrap();
    assert_eq!(paid.amount_cents, 2 * 1999);
    shop.check_invariants().await;
}
