// A whole saga through a Node client that loads proto/ as it is, with
// @grpc/grpc-js and @grpc/proto-loader (no generation step, no protoc).
// Run by scripts/generated-clients with ADMIN_TOKEN, CUSTOMER_ID and
// CUSTOMER_TOKEN (a customer who registers themselves) in the environment.
"use strict";

const path = require("node:path");
const crypto = require("node:crypto");
const grpc = require("@grpc/grpc-js");
const loader = require("@grpc/proto-loader");

const root = path.join(__dirname, "..", "..", "..", "proto");
const definition = loader.loadSync(
  ["shop/user/v1/user.proto", "shop/order/v1/order.proto",
   "shop/inventory/v1/inventory.proto", "shop/payment/v1/payment.proto"],
  { includeDirs: [root], keepCase: true, longs: String, enums: String, defaults: true },
);
const shop = grpc.loadPackageDefinition(definition).shop;
const host = process.env.SHOP_HOST || "localhost";
const client = (Service, port) => new Service(`${host}:${port}`, grpc.credentials.createInsecure());

function bearer(token) {
  const metadata = new grpc.Metadata();
  if (token) metadata.set("authorization", `Bearer ${token}`);
  return metadata;
}

function call(stub, method, request, metadata) {
  return new Promise((resolve, reject) =>
    stub[method](request, metadata, (error, response) => (error ? reject(error) : resolve(response))));
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function refused(stub, method, request, metadata, expected) {
  try {
    await call(stub, method, request, metadata);
  } catch (error) {
    if (error.code !== expected) throw new Error(`expected code ${expected}, got ${error.code}: ${error.details}`);
    console.log(`refused as it should be: code ${error.code}: ${error.details}`);
    return;
  }
  throw new Error(`expected code ${expected}, but ${method} succeeded`);
}

async function main() {
  const admin = bearer(process.env.ADMIN_TOKEN);
  const customerId = process.env.CUSTOMER_ID;
  const customer = bearer(process.env.CUSTOMER_TOKEN);
  const users = client(shop.user.v1.UserService, 50051);
  const orders = client(shop.order.v1.OrderService, 50052);
  const inventory = client(shop.inventory.v1.InventoryService, 50053);
  const payments = client(shop.payment.v1.PaymentService, 50054);

  const sku = `JS-${crypto.randomBytes(4).toString("hex").toUpperCase()}`;
  await call(inventory, "CreateProduct", { sku, name: "Node lamp", price_cents: 1250, stock: 5 }, admin);
  const { user } = await call(users, "CreateUser",
    { email: `js-${customerId.slice(0, 8)}@example.com`, name: "No De" }, customer);
  if (user.user_id !== customerId) throw new Error(`registered as ${user.user_id}, not ${customerId}`);
  console.log(`registered ${user.email} as ${user.user_id}`);

  const request = { user_id: customerId, items: [{ sku, quantity: 1 }], idempotency_key: `js-${crypto.randomUUID()}` };
  let order;
  for (const started = Date.now(); ; await sleep(50)) {
    try {
      ({ order } = await call(orders, "PlaceOrder", request, customer));
      break;
    } catch (error) {
      // The order service learns of a new user from user.created.
      if (error.code !== grpc.status.FAILED_PRECONDITION || Date.now() - started > 10000) throw error;
    }
  }
  for (const started = Date.now(); order.status === "ORDER_STATUS_PENDING"; ) {
    if (Date.now() - started > 30000) throw new Error(`order ${order.order_id} still pending`);
    await sleep(50);
    ({ order } = await call(orders, "GetOrder", { order_id: order.order_id }, customer));
  }
  console.log(`order ${order.order_id}: ${order.status}, ${order.total_cents} cents, steps ${order.steps.map((s) => s.name).join(" ")}`);
  if (order.status !== "ORDER_STATUS_CONFIRMED") throw new Error(`not confirmed: ${order.cancel_reason}`);
  const { account } = await call(payments, "GetAccount", { user_id: customerId }, customer);
  console.log(`balance ${account.balance_cents} cents`);

  const deposit = { user_id: customerId, amount_cents: 100 };
  await refused(payments, "Deposit", deposit, bearer(null), grpc.status.UNAUTHENTICATED);
  await refused(payments, "Deposit", deposit, customer, grpc.status.PERMISSION_DENIED);
  console.log("node client: saga confirmed, refusals as expected");
  for (const stub of [users, orders, inventory, payments]) stub.close();
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
