#!/usr/bin/env node
// Follow Palisade's audit stream from Node.js: one line of JSON per audit record, each validated
// against the exported AuditRecord schema.
//
//   node audit.mjs --contract DIR [--bind '#'] [--message-id ID] [--count N] [--timeout SECONDS] \
//        [--url amqp://guest:guest@127.0.0.1:5672/]
//
// Binds a temporary queue (server-named, exclusive, deleted on disconnect) to the topic exchange
// `palisade.audit` with the routing key pattern --bind (`<worker>.<action>.<outcome>`, default every
// record), says "listening" on stderr once bound, and prints each record on stdout. With
// --message-id only the records deciding that message; with --count it exits 0 after that many,
// with --timeout it exits 4 if they did not all come in time. A record that does not match the
// schema is reported on stderr and exits 5: the contract was broken.

import amqp from "amqplib";

import { Contract, ContractError, parseArgs } from "./contract.mjs";

const AUDIT_EXCHANGE = "palisade.audit";

async function main() {
  const args = parseArgs(process.argv.slice(2), {
    bind: "#",
    url: process.env.PALISADE_AMQP_URL ?? "amqp://guest:guest@127.0.0.1:5672/",
  });
  if (!args.contract) throw new ContractError("--contract DIR is required (palisade schema export --out DIR)");
  const contract = await Contract.load(args.contract);
  await contract.validator("AuditRecord");
  const wanted = args.count === undefined ? Infinity : Number(args.count);

  const connection = await amqp.connect(args.url);
  const channel = await connection.createChannel();
  await channel.checkExchange(AUDIT_EXCHANGE);
  const { queue } = await channel.assertQueue("", { exclusive: true, autoDelete: true, durable: false });
  await channel.bindQueue(queue, AUDIT_EXCHANGE, args.bind);

  return new Promise((resolve, reject) => {
    let seen = 0;
    const finish = (code) => {
      clearTimeout(timer);
      connection.close().then(() => resolve(code), reject);
    };
    const timer = args.timeout
      ? setTimeout(() => {
          console.error(`timeout: ${seen} of ${wanted} record(s) after ${args.timeout}s`);
          finish(4);
        }, Number(args.timeout) * 1000)
      : undefined;

    channel
      .consume(
        queue,
        async (msg) => {
          if (msg === null) return finish(1); // cancelled by the broker
          let record;
          try {
            record = JSON.parse(msg.content.toString("utf8"));
          } catch {
            console.error(`not JSON on ${msg.fields.routingKey}`);
            return finish(5);
          }
          const errors = await contract.errors("AuditRecord", record);
          if (errors.length) {
            console.error(`audit record on ${msg.fields.routingKey} does not match the schema:`);
            for (const line of errors) console.error(`  ${line}`);
            return finish(5);
          }
          if (args["message-id"] && record.message_id !== args["message-id"]) return;
          console.log(JSON.stringify({ routing_key: msg.fields.routingKey, ...record }));
          if (++seen >= wanted) finish(0);
        },
        { noAck: true },
      )
      .then(() => console.error(`listening on ${AUDIT_EXCHANGE} (${args.bind}) with ${queue}`), reject);
  });
}

main().then(
  (code) => process.exit(code),
  (err) => {
    console.error(err instanceof ContractError ? err.message : err);
    process.exit(1);
  },
);
