import Foundation
import Testing

@testable import VMTemplateAPI
@testable import VMTemplateKit
@testable import VMTemplateOS
@testable import VMTemplateStore

#if canImport(Glibc)
import Glibc
#endif

/// The systemd unit's limits that QEMU inherits (system call filter, capability bounding set,
/// no_new_privs), applied by scripts/unit-sandbox as systemd would: a server under them makes
/// templates, fills pools and clones with taps and disks whose guests work.
extension RealGuests {
    @Suite("clones under the unit's limits", .serialized)
    struct UnitLimitsTests {
        @Test("serve under the unit's syscall filter, bounding set and no_new_privs: a template made, a pool filled, a clone on a tap in a namespace with an overlay disk, whose guest reaches the namespace; QEMU runs under the filter", .enabled(if: Environment.isRoot, "needs root for taps and namespaces"))
        func clonesUnderTheUnit() async throws {
            let sandbox = "\(Checkout.root)/scripts/unit-sandbox"
            let store = try TemporaryStore("unit")
            defer { store.remove() }
            let namespace = try NetworkNamespace(bridgeAddress: "10.78.0.1/24", taps: ["vmt-unit0"])
            defer { namespace.remove() }
            let images = try TestImages()
            defer { images.remove() }
            let process = Process()
            process.executableURL = URL(fileURLWithPath: sandbox)
            process.arguments = ["--", Checkout.binary, "serve"] + store.arguments
            let log = FileHandle(forWritingAtPath: "/dev/null")
            process.standardOutput = log
            process.standardError = log
            try process.run()
            defer {
                process.terminate()
                process.waitUntilExit()
                _ = try? CLI.run(["pool", "set", "made", "--size", "0"] + store.arguments)
                _ = try? CLI.run(["rm", "--all"] + store.arguments)
            }
            let client = UnixHTTPClient(socketPath: "\(store.root)/serve.sock")
            #expect(await eventually(timeout: .seconds(20)) { (try? client.request("GET", "/v1/health"))?.status == 200 })
            let status = try String(contentsOfFile: "/proc/\(process.processIdentifier)/status", encoding: .utf8)
            #expect(status.contains("NoNewPrivs:\t1") && status.contains("Seccomp:\t2"), "the server runs under the filter: \(status)")

            // A template made by the server (its QEMU under the filter), then a pool of it.
            var recipe = try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: Checkout.busyboxRecipe))) as? [String: Any])
            let directory = URL(fileURLWithPath: Checkout.busyboxRecipe).deletingLastPathComponent().path
            recipe["kernel"] = "\(directory)/\(recipe["kernel"] as? String ?? "")"
            recipe["initrd"] = "\(directory)/\(recipe["initrd"] as? String ?? "")"
            let body = try JSONSerialization.data(withJSONObject: ["name": "made", "recipe": recipe])
            #expect(try client.request("POST", "/v1/templates", body: body).status == 202)
            #expect(await eventually(timeout: .seconds(120)) { (try? client.request("GET", "/v1/templates/made"))?.status == 200 }, "the template was made under the filter")
            #expect(try client.request("PUT", "/v1/pools/made", body: Data(#"{"size": 1}"#.utf8)).status == 200)
            #expect(await eventually(timeout: .seconds(60)) {
                (try? client.request("GET", "/v1/pools")).map { String(decoding: $0.body, as: UTF8.self).contains("\"ready\" : 1") } ?? false
            }, "a pool member was made and warmed under the filter")

            // A clone with a tap in a namespace and an overlay disk; its guest uses both.
            let request = #"{"template": "made", "name": "confined", "no_pool": true, "wait_devices": true, "nics": [{"backend": "tap", "tap": "vmt-unit0", "netns": "\#(namespace.path)"}], "disks": [{"path": "\#(images.raw)", "overlay": true}]}"#
            let made = try client.request("POST", "/v1/clones", body: Data(request.utf8))
            try #require(made.status == 201, "\(String(decoding: made.body, as: UTF8.self))")
            let clone = try JSONCoding.decoder().decode(CloneView.self, from: made.body)
            #expect(clone.devicesReady == true)
            let qemu = try String(contentsOfFile: "/proc/\(try #require(clone.pid))/status", encoding: .utf8)
            let filters = qemu.split(separator: "\n").first { $0.hasPrefix("Seccomp_filters:") }.flatMap { Int($0.split(separator: "\t").last ?? "") } ?? 0
            #expect(filters >= 2, "QEMU runs under the unit's filter and its own -sandbox: \(qemu)")
            let channel = ControlChannel(path: clone.controlSocket)
            #expect(try channel.request("ip eth0 10.78.0.2/24", timeout: .seconds(60)) == "ok")
            #expect(try channel.request("ping 10.78.0.1") == "ok", "the guest reaches the namespace through the tap")
            #expect(try namespace.ping("10.78.0.2"), "the namespace reaches the guest")
            #expect(try channel.request("write vda 0 cafe") == "wrote 2", "the guest writes its overlay")
            // The scheduler measures and enforces a limit under the bounding set (no CAP_SYS_PTRACE):
            // a limit must not fail open there.
            let limited = try client.request("POST", "/v1/clones", body: Data(#"{"template": "made", "name": "limited", "no_pool": true, "cow_limit": "4M"}"#.utf8))
            try #require(limited.status == 201)
            let limitedView = try JSONCoding.decoder().decode(CloneView.self, from: limited.body)
            // The scheduler may pause it before it answers: the answer is not waited for.
            _ = try? ControlChannel(path: limitedView.controlSocket).request("dirty 16", timeout: .seconds(20))
            #expect(await eventually(timeout: .seconds(30)) {
                (try? client.request("GET", "/v1/clones/limited")).flatMap { try? JSONCoding.decoder().decode(CloneView.self, from: $0.body) }?.pausedBy == .scheduler
            }, "paused by the scheduler over its limit")
            let removed = try client.request("DELETE", "/v1/clones/confined")
            #expect(removed.status == 200, "\(String(decoding: removed.body, as: UTF8.self))")
        }
    }
}
