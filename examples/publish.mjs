#!/usr/bin/env node
// Publish one Palisade command from Node.js, validated against the exported JSON Schema first.
//
//   node publish.mjs --contract DIR [--type DomainAdded] --service-id SERVICE_ID \
//        [--payload '{"domain": "shop.example.com"}'] [--actor u-42] [--url amqp://guest:guest@127.0.0.1:5672/]
//
// The envelope is built here (message_id, occurred_at, correlation_id, actor ...), checked with ajv
// against DIR/schemas/<Type>.json, and only when valid published to the exchange and routing key the
// AsyncAPI document gives for the type: persistent, mandatory, with a publisher confirm. Prints the
// message id (stdout). Exit codes: 0 published, 1 usage or connection error, 2 refused by the schema
// (nothing published), 3 unroutable (no queue bound: is the worker's queue declared?).

import { randomUUID } from "node:crypto";

import amqp from "amqplib";

import { Contract, ContractError, parseArgs } from "./contract.mjs";

async function main() {
  const args = parseArgs(process.argv.slice(2), {
    type: "DomainAdded",
    payload: "{}",
    actor: "node-example",
    url: process.env.PALISADE_AMQP_URL ?? "amqp://guest:guest@127.0.0.1:5672/",
  });
  if (!args.contract) throw new ContractError("--contract DIR is required (palisade schema export --out DIR)");
  const contract = await Contract.load(args.contract);

  let payload;
  try {
    payload = JSON.parse(args.payload);
  } catch (err) {
    throw new ContractError(`--payload is not JSON: ${err.message}`);
  }
  const messageId = randomUUID();
  const envelope = {
    message_id: messageId,
    type: args.type,
    version: await contract.version(args.type),
    occurred_at: new Date().toISOString(),
    correlation_id: messageId, // a new user action: its own correlation id
    causation_id: null,
    actor: { kind: "user", id: args.actor },
    service_id: args["service-id"] ?? null,
    account_id: args["account-id"] ?? null,
    payload,
  };
  const errors = await contract.errors(args.type, envelope);
  if (errors.length) {
    console.error(`refused: ${args.type} does not match its schema; nothing published`);
    for (const line of errors) console.error(`  ${line}`);
    return 2;
  }
  const { exchange, routingKey } = contract.route(args.type);

  const connection = await amqp.connect(args.url);
  try {
    const channel = await connection.createConfirmChannel();
    let returned = null;
    channel.on("return", (msg) => {
      returned = msg.fields.replyText;
    });
    channel.publish(exchange, routingKey, Buffer.from(JSON.stringify(envelope)), {
      persistent: true,
      mandatory: true,
      messageId,
      correlationId: messageId,
      contentType: "application/json",
      type: args.type,
      timestamp: Math.floor(Date.now() / 1000),
    });
    await channel.waitForConfirms(); // a returned message is returned before its confirm
    if (returned) {
      console.error(`unroutable: ${exchange} ${routingKey} (${returned})`);
      return 3;
    }
    console.log(messageId);
    await channel.close();
    return 0;
  } finally {
    await connection.close();
  }
}

main().then(
  (code) => process.exit(code),
  (err) => {
    console.error(err instanceof ContractError ? err.message : err);
    process.exit(1);
  },
);
