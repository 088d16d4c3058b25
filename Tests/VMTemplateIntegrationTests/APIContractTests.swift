import Foundation
import Testing

@testable import VMTemplateAPI
@testable import VMTemplateOS
@testable import VMTemplateStore

/// The API held to tools nobody here wrote (scripts/api-contract): a client generated from
/// docs/api.openapi.json by openapi-python-client drives a clone's life, and schemathesis fuzzes
/// every operation of the live server with every check, stateful links included.
extension RealGuests {
    @Suite("the API against third-party tools", .serialized)
    struct APIContractTests {
        @Test("a generated client drives create → events → devices → remove; schemathesis with every check, stateful links included, finds nothing")
        func thirdPartyTools() async throws {
            let python = "\(Checkout.root)/.build/test-tools/bin/python"
            try #require(FileManager.default.isExecutableFile(atPath: python), "scripts/setup --for-tests installs schemathesis and openapi-python-client into .build/test-tools")
            // busybox for every operation to clone; spare for the fuzzed removal to take.
            let store = try TemporaryStore.withTemplates("contract", ["busybox", "spare"])
            defer { store.remove() }
            // A bound on what the fuzzer can start: it sizes pools and clones at will.
            _ = try CLI.run(["settings", "--max-clones", "6"] + store.arguments)
            let server = try CLI.start(["serve"] + store.arguments)
            defer {
                server.process.terminate()
                server.process.waitUntilExit()
                _ = try? CLI.run(["pool", "set", "busybox", "--size", "0"] + store.arguments)
                _ = try? CLI.run(["rm", "--all"] + store.arguments)
            }
            let socket = "\(store.root)/serve.sock"
            #expect(await eventually(timeout: .seconds(20)) { (try? UnixHTTPClient(socketPath: socket).request("GET", "/v1/health"))?.status == 200 })
            let work = NSTemporaryDirectory() + "vmt-contract-\(UUID().uuidString.prefix(8))"
            defer { try? FileManager.default.removeItem(atPath: work) }
            let result = try ShortCommand.run(python, ["\(Checkout.root)/scripts/api-contract", "--socket", socket, "--workdir", work, "--max-examples", "20"])
            #expect(result.stderr.contains("generated client: ok"), "\(result.stderr.suffix(4000))")
            #expect(result.status == 0, "scripts/api-contract failed:\n\(result.stdout.suffix(12000))\n\(result.stderr.suffix(4000))")
        }
    }
}
