"""A whole saga through a Python client generated from proto/ (grpcio-tools).

Run by scripts/generated-clients, which generates the client into a
temporary directory, puts it on PYTHONPATH and passes the tokens:
ADMIN_TOKEN (an administrator's), CUSTOMER_ID and CUSTOMER_TOKEN (a customer
whose token's subject is CUSTOMER_ID, who registers themselves). Endpoints
default to the local stack's ports.
"""

import os
import sys
import time
import uuid

import grpc

from shop.inventory.v1 import inventory_pb2, inventory_pb2_grpc
from shop.order.v1 import order_pb2, order_pb2_grpc
from shop.payment.v1 import payment_pb2, payment_pb2_grpc
from shop.user.v1 import user_pb2, user_pb2_grpc

HOST = os.environ.get("SHOP_HOST", "localhost")


def stub(factory, port):
    return factory(grpc.insecure_channel(f"{HOST}:{port}"))


def bearer(token):
    return (("authorization", f"Bearer {token}"),)


def refused(call, request, metadata, expected):
    try:
        call(request, metadata=metadata)
    except grpc.RpcError as error:
        if error.code() != expected:
            sys.exit(f"expected {expected.name}, got {error.code().name}: {error.details()}")
        print(f"refused as it should be: {error.code().name}: {error.details()}")
        return
    sys.exit(f"expected {expected.name}, but the call succeeded")


def main():
    admin = bearer(os.environ["ADMIN_TOKEN"])
    customer_id = os.environ["CUSTOMER_ID"]
    customer = bearer(os.environ["CUSTOMER_TOKEN"])
    users = stub(user_pb2_grpc.UserServiceStub, 50051)
    orders = stub(order_pb2_grpc.OrderServiceStub, 50052)
    inventory = stub(inventory_pb2_grpc.InventoryServiceStub, 50053)
    payments = stub(payment_pb2_grpc.PaymentServiceStub, 50054)

    sku = f"PY-{uuid.uuid4().hex[:8].upper()}"
    inventory.CreateProduct(
        inventory_pb2.CreateProductRequest(sku=sku, name="Python mug", price_cents=750, stock=5),
        metadata=admin,
    )
    user = users.CreateUser(
        user_pb2.CreateUserRequest(email=f"py-{customer_id[:8]}@example.com", name="Py Thon"),
        metadata=customer,
    ).user
    assert user.user_id == customer_id, (user.user_id, customer_id)
    print(f"registered {user.email} as {user.user_id}")

    request = order_pb2.PlaceOrderRequest(
        user_id=customer_id,
        items=[order_pb2.OrderItem(sku=sku, quantity=2)],
        idempotency_key=f"py-{uuid.uuid4()}",
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            order = orders.PlaceOrder(request, metadata=customer).order
            break
        except grpc.RpcError as error:
            # The order service learns of a new user from user.created.
            if error.code() != grpc.StatusCode.FAILED_PRECONDITION or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    deadline = time.monotonic() + 30
    while order.status == order_pb2.ORDER_STATUS_PENDING:
        if time.monotonic() > deadline:
            sys.exit(f"order {order.order_id} still pending")
        time.sleep(0.05)
        order = orders.GetOrder(order_pb2.GetOrderRequest(order_id=order.order_id), metadata=customer).order
    status = order_pb2.OrderStatus.Name(order.status)
    print(f"order {order.order_id}: {status}, {order.total_cents} cents, steps {[s.name for s in order.steps]}")
    if order.status != order_pb2.ORDER_STATUS_CONFIRMED:
        sys.exit(f"order not confirmed: {order.cancel_reason}")
    account = payments.GetAccount(payment_pb2.GetAccountRequest(user_id=customer_id), metadata=customer).account
    print(f"balance {account.balance_cents} cents")

    deposit = payment_pb2.DepositRequest(user_id=customer_id, amount_cents=100)
    refused(payments.Deposit, deposit, (), grpc.StatusCode.UNAUTHENTICATED)
    refused(payments.Deposit, deposit, customer, grpc.StatusCode.PERMISSION_DENIED)
    print("python client: saga confirmed, refusals as expected")


if __name__ == "__main__":
    main()
